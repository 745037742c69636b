"""What every command shares, without torch: atomic writes, JSON Lines, the shards' names, the scores to beat, the hub.

    python -c "import files; print(files.shard_pattern('train'), repr(files.hub_offline(False)))"
"""

import contextlib
import errno
import http.client
import json
import os
import urllib.error
import urllib.request

SHARD_PREFIX = "edufineweb"  # build-nanogpt's names: edufineweb_val_000000.npy, edufineweb_train_000001.npy, ...
# GPT-2 124M on FineWeb-Edu's val shard and HellaSwag's 10,042 val examples (acc_norm); GPT-3 small's from its paper
REFERENCES = {"gpt2": {"label": "OpenAI GPT-2 124M", "val": 3.2924, "hella": 0.2955},
              "gpt3": {"label": "OpenAI GPT-3 124M", "hella": 0.337}}


class WriteError(Exception):
    """A file the file system refused: its path and reason (not an OSError); `context` (the step) set by the caller."""

    FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, None)  # no space, a file-size limit, a quota, unknown

    def __init__(self, path, reason, code=None):
        super().__init__(path, reason)
        self.path, self.reason, self.code, self.context = path, reason, code, ""

    def __str__(self):
        context = f" {self.context}" if self.context else ""
        todo = "free space" if self.code in self.FULL else "make it writable"  # a vanished or read-only directory
        return f"cannot write {self.path} ({self.reason}){context}; {todo} and run the same command again"

    @classmethod
    def of(cls, path, error):
        """The WriteError of path for an OSError, in the operating system's words ("No space left on device")."""
        return cls(path, error.strerror or str(error), error.errno)


class _RecordingFile:
    """A file whose write() keeps its OSError: torch.save would raise a vague RuntimeError, np.save nothing at all."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path, write, tmp=None):
    """write(file) into a temporary file next to path (tmp, default .NAME.tmp), renamed to path: a kill leaves the old
    file or the new one. WriteError naming path if the file system refuses; write()'s other errors pass as they are."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, tmp or f".{os.path.basename(path)}.tmp")
    f, written = None, False
    try:
        with open(tmp, "wb") as raw:
            f = _RecordingFile(raw)
            write(f)
            written = True
            raw.flush()
            os.fsync(raw.fileno())  # on disk before the rename: a power cut leaves no empty file under the real name
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        refused = f.error if f is not None and not written else e  # in write(): a write the file refused, if any
        if isinstance(refused, OSError):
            raise WriteError.of(path, refused) from e
        raise
    with contextlib.suppress(OSError):  # the rename itself, on disk (where a directory can be opened)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class JSONLinesError(ValueError):
    """A line of a JSON Lines file that is not UTF-8 or not JSON; the message names the file and line."""


def jsonl_records(path):
    """(where "path:line", record) for each non-blank line of a JSON Lines file; JSONLinesError for a bad line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line.rstrip("\r\n"))  # the column of an error on this line, not the next
            except UnicodeDecodeError as e:
                raise JSONLinesError(f"{where}: not UTF-8 ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise JSONLinesError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            yield where, record


def shard_filename(index):
    """Shard 0 is the val shard, the first tokens of the stream; 1, 2, ... are the train shards."""
    return f"{SHARD_PREFIX}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def shard_pattern(split):
    return f"{SHARD_PREFIX}_{split}_*.npy"


def hub_offline(offline_mode, timeout=3):
    """Why the Hugging Face hub can't serve a file ("" if it can): offline_mode, the loading library's own flag
    (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE), or no answer to one HEAD request to
    its endpoint. Unreachable, huggingface_hub retries 5 times with backoff (~25 s, two warnings each) before it
    fails: with this answer a caller loads from the local cache only, and fails at once."""
    from huggingface_hub import constants

    if offline_mode:
        return "offline mode (HF_HUB_OFFLINE)"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return ""  # an HTTP answer, whatever its status: the hub is there
    except (OSError, ValueError, http.client.HTTPException) as e:  # no DNS, refused, timeout, a bad HF_ENDPOINT
        return f"no network ({constants.ENDPOINT} unreachable: {getattr(e, 'reason', e)})"
    return ""

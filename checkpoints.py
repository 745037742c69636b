"""The run directory: its lock, checkpoints, log.txt and config.json (written atomically); a model from any source.

    python -c "import checkpoints; print(checkpoints.list_checkpoints('log'))"
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import socket
import zipfile

import torch

from files import WriteError, atomic_write
from model import GPT, GPTConfig
from options import ConfigError

CHECKPOINT_RE = re.compile(r"^model_(\d+)\.pt$")
PARTIAL_RE = re.compile(r"^\.model_\d+\.pt\.tmp$")  # what a kill during a checkpoint save leaves behind
TRAIN_KEYS = ("model", "optimizer", "step", "loader", "rng", "config", "train_config")  # what a resume needs


# -----------------------------------------------------------------------------

def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir):
    """[(step, path)] of the checkpoints in log_dir, oldest first."""
    if not os.path.isdir(log_dir):
        return []
    return sorted((int(m.group(1)), os.path.join(log_dir, name))
                  for name in os.listdir(log_dir) if (m := CHECKPOINT_RE.match(name)))


def rng_state(device):
    """The torch RNG states as tensors (loadable with weights_only=True). Training draws no random numbers (no
    dropout, and sampling has its own generator); they are saved so that a model with randomness resumes exactly."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def save_checkpoint(path, *, raw_model, optimizer, step, loader, train_config, device):
    """Everything an exact resume needs, as plain tensors and dicts (torch.load(weights_only=True) reads them), written
    atomically. train_config: the options as a plain dict."""
    checkpoint = {
        "model": raw_model.state_dict(),  # the plain module: no "module." (DDP) or "_orig_mod." (compile) prefixes
        "optimizer": optimizer.state_dict(),
        "step": step,  # optimizer steps done: the run continues with step `step`
        "loader": loader.state_dict(),
        "rng": rng_state(device),
        "config": dataclasses.asdict(raw_model.config),  # GPTConfig: what hellaswag.py --model needs to rebuild it
        "train_config": train_config,
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def save_run_checkpoint(log_dir, step, *, keep, master, log, **state):
    """model_{step}.pt in log_dir with save_checkpoint's state, written by rank 0 (master), which then keeps the newest
    `keep` and logs it; every rank gets the path."""
    path = checkpoint_path(log_dir, step)
    if master:
        save_checkpoint(path, step=step, **state)
        prune_checkpoints(log_dir, keep)
        log(f"step {step:5d} | saved {path}")
    return path


def prune_checkpoints(log_dir, keep):
    """Delete all but the newest `keep` checkpoints (keep 0: delete none)."""
    if keep:
        for _, old in list_checkpoints(log_dir)[:-keep]:
            os.remove(old)


def load_checkpoint(path, keys=TRAIN_KEYS, kind="train_gpt2.py checkpoint"):
    """The dict torch.save wrote to path, with at least `keys`. Raises ConfigError naming the file and the problem."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else would get torch's advice to unpickle it unsafely
        raise ConfigError(f"{path}: cannot load the checkpoint: it is not a {kind} (not a file torch.save wrote)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing file, a truncated zip, a foreign object: one line, not their traceback
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: cannot load the checkpoint: {first_line}") from None
    if not isinstance(checkpoint, dict) or not set(keys) <= checkpoint.keys():
        names = [repr(k) for k in keys]
        raise ConfigError(f"{path}: not a {kind} (expected {', '.join(names[:-1])} and {names[-1]})")
    return checkpoint


def find_checkpoint(log_dir, resume, log=print):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run: resume "auto" takes the newest checkpoint
    of log_dir that loads (none: a fresh run), a path takes that one, "" refuses a log_dir that holds checkpoints."""
    existing = list_checkpoints(log_dir)
    if not existing and resume in ("auto", ""):
        return None, None
    return resumed_checkpoint(log_dir, resume, existing, log)


def resumed_checkpoint(log_dir, resume, existing, log):
    """find_checkpoint's answer where log_dir holds checkpoints or resume names one."""
    if resume not in ("auto", ""):
        path, checkpoint = resume, load_checkpoint(resume)
    elif resume == "auto":
        path, checkpoint, existing = newest_loadable(log_dir, existing, log)
    else:
        raise ConfigError(f"log_dir {log_dir} already holds checkpoints ({os.path.basename(existing[-1][1])}): "
                          "continue with --resume=auto, or pick another --log_dir")
    if any(step > checkpoint["step"] for step, _ in existing):
        raise ConfigError(f"log_dir {log_dir} holds checkpoints newer than step {checkpoint['step']} of {path}: "
                          "move them away or pick another --log_dir (a resumed run would mix two histories)")
    return path, checkpoint


def newest_loadable(log_dir, existing, log):
    """(path, checkpoint, the checkpoints that load) for the newest of existing [(step, path)] that loads: an
    unreadable one (truncated by a disk fault, say) is reported and the one before it tried."""
    unreadable = []
    for step, path in reversed(existing):
        try:
            checkpoint = load_checkpoint(path)
            break
        except ConfigError as e:
            log(f"warning: {e}")
            unreadable.append(step)
    else:
        raise ConfigError(f"log_dir {log_dir}: none of its {len(existing)} checkpoints loads (see the warnings): "
                          "move them away to start afresh, or pass --resume=PATH with a good copy")
    if unreadable:
        log(f"resuming from {path}, the newest checkpoint that loads; the unreadable newer ones will be "
            "overwritten as the run passes their steps")
    return path, checkpoint, [(step, p) for step, p in existing if step not in unreadable]


@contextlib.contextmanager
def locked_run_dir(log_dir):
    """Create log_dir and hold the kernel's flock on it (never stale) while the block runs: a second run into it is
    refused in one line naming the holder. The directories it created go again if still empty at the end."""
    created = missing_dirs(log_dir)
    try:
        os.makedirs(log_dir, exist_ok=True)
        if not os.access(log_dir, os.W_OK):
            raise PermissionError(13, "Permission denied")
        fd = os.open(log_dir, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"--log_dir {log_dir}: cannot create or write it ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"log_dir {log_dir} is in use by another run ({lock_holder(fd)}); wait for it to end, "
                              "or pick another --log_dir") from None
        yield
    finally:
        os.close(fd)  # releases the lock
        remove_empty(created)


def missing_dirs(path):
    """The directories os.makedirs(path) would create, the deepest first."""
    missing, path = [], os.path.normpath(path)
    while path and not os.path.exists(path):  # up to "" above a relative path; "/" exists
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_empty(dirs):
    """Remove each of dirs (the deepest first) that is an empty directory; stop at the first that is not."""
    for path in dirs:
        try:
            os.rmdir(path)  # refuses a directory that holds anything
        except OSError:
            return


def lock_holder(fd):
    """'pid N' of the process holding the flock on fd's file, from Linux's /proc/locks; a description elsewhere."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146373 0 EOF"
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where:
                    return f"pid {fields[4]} on {socket.gethostname()}"
    return "a process on this or another machine"


def load_optimizer_state(optimizer, saved):
    """Restore an optimizer's state (moments, step counts) but keep the hyperparameters and flags it was just built
    with (lr, weight_decay, betas, eps, fused...): load_state_dict alone would bring back the checkpoint's, and a
    resumed run must apply the options it is given. Merged before loading, because `fused` decides where the `step`
    tensors go (the param's device for fused AdamW)."""
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        saved_group.update({k: v for k, v in group.items() if k != "params"})
    optimizer.load_state_dict(saved)


def compare_configs(saved, current):
    """The options that differ from the checkpoint's, as 'name: old -> new' (resume and paths aside)."""
    ignore = {"resume", "log_dir", "data_dir", "hellaswag_data"}
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in current.items()
            if k not in ignore and k in saved and saved[k] != v]


# -----------------------------------------------------------------------------

def checkpoint_config(checkpoint, source=None):
    """The GPTConfig of a checkpoint's "config". Raises ConfigError (naming source, else the caller names the file)."""
    try:
        return GPTConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{source + ': ' if source else ''}bad 'config': {e}") from None


def model_from_checkpoint(checkpoint, source=None):
    """The GPT a checkpoint's "config" and "model" describe. Raises ConfigError (naming source, as above)."""
    model = GPT(checkpoint_config(checkpoint, source))
    problem = state_dict_mismatch(model.state_dict(), checkpoint["model"])
    if problem:
        raise ConfigError(f"{source + ': ' if source else ''}'model' does not match its 'config': {problem}")
    model.load_state_dict(checkpoint["model"])
    return model


def pretrained_weights(init_from):
    """GPT-2's weights to start a run from, as a checkpoint's "model" and "config" (no optimizer state, no step):
    init_from is a hub id (gpt2, gpt2-medium...) or a transformers directory."""
    try:
        model = GPT.from_pretrained(init_from)
    except ValueError as e:
        raise ConfigError(f"--init_from={init_from}: {e}") from None
    return {"model": model.state_dict(), "config": dataclasses.asdict(model.config)}


def state_dict_mismatch(expected, found):
    """One line on how the state dict `found` differs from `expected` (missing, unexpected, misshapen), or ""."""
    if not isinstance(found, dict):
        return f"expected a state dict, got {type(found).__name__}"
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshapen = [f"{k} is {tuple(getattr(found[k], 'shape', ()))}, not {tuple(v.shape)}"
                 for k, v in expected.items() if k in found and getattr(found[k], "shape", None) != v.shape]
    problems = [f"{len(missing)} missing tensors (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})" if unexpected else "",
                f"{len(misshapen)} of other shapes (e.g. {misshapen[0]})" if misshapen else ""]
    return ", ".join(p for p in problems if p)


def load_model(source):
    """(GPT on the CPU, the train_config of its checkpoint or None) from a run directory of train_gpt2.py or chat_sft.py
    (its newest checkpoint), a checkpoint file, a transformers GPT-2 directory or a hub id (gpt2, gpt2-xl...). Raises
    ConfigError with one line naming the file and the problem."""
    path = source
    if os.path.isdir(source):  # a run directory (its config.json is the run's), else a transformers directory
        found = list_checkpoints(source)
        if found:
            path = found[-1][1]
        elif not os.path.exists(os.path.join(source, "config.json")):
            raise ConfigError(f"{source}: holds no checkpoint (model_NNNNN.pt) and no transformers model "
                              "(config.json)")
    if os.path.isfile(path):
        if os.path.basename(path) == "config.json" or path.endswith((".safetensors", ".bin")):
            raise ConfigError(f"{path}: a file of a transformers model: pass its directory, "
                              f"{os.path.dirname(path) or '.'}")
        checkpoint = load_checkpoint(path, keys=("model", "config"), kind="train_gpt2.py checkpoint (or chat_sft.py's)")
        train_config = checkpoint.get("train_config")
        return model_from_checkpoint(checkpoint, path), train_config if isinstance(train_config, dict) else None
    try:
        return GPT.from_pretrained(source), None
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None


# -----------------------------------------------------------------------------

def read_log_lines(path, before_step):
    """The complete lines of a log whose step is < before_step (a line cut off by a kill has no newline)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]  # the last element is "" or an unfinished line
    kept = []
    for line in lines:
        first = line.split(" ", 1)[0]
        if first.isdigit() and int(first) < before_step:
            kept.append(line + "\n")
    return kept


def prepare_log_dir(log_dir, start_step, resolved):
    """log_dir with config.json written, half-written checkpoints gone and log.txt cut back to the lines before
    start_step (a resumed run redoes that step's evals: no duplicates). Returns log.txt's path."""
    os.makedirs(log_dir, exist_ok=True)
    for name in filter(PARTIAL_RE.match, os.listdir(log_dir)):  # what a kill during a save left (a whole checkpoint)
        os.remove(os.path.join(log_dir, name))
    text = json.dumps(resolved, indent=2) + "\n"
    atomic_write(os.path.join(log_dir, "config.json"), lambda f: f.write(text.encode()))
    log_path = os.path.join(log_dir, "log.txt")
    kept = read_log_lines(log_path, start_step) if start_step else []  # a fresh run starts an empty log
    atomic_write(log_path, lambda f: f.write("".join(kept).encode()))
    return log_path


def append_log(log_path, step, kind, value, fmt):
    """One build-nanogpt log line, `{step} {kind} {value}`, appended at once with one os.write: a kill loses at most
    the line being written (and a resume drops an unfinished line). A write the file system refuses part way (a full
    disk, a file-size limit) is cut back to the lines before it, and raises WriteError."""
    line = f"{step} {kind} {value:{fmt}}\n".encode()
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise WriteError.of(log_path, e) from None
    try:
        size = os.fstat(fd).st_size
        rest = memoryview(line)
        while rest:  # a short write (the limit reached mid-line) is retried, and then fails with the reason
            rest = rest[os.write(fd, rest):]
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)  # no half line: the rerun appends after whole lines
        raise WriteError.of(log_path, e) from None
    finally:
        os.close(fd)


def failure_context(log_dir, step):
    """What a WriteError at `step` adds: the checkpoint of log_dir a rerun continues from, the newest, whole by
    construction (atomic_write)."""
    found = list_checkpoints(log_dir)
    return f"at step {step}; {f'the newest checkpoint, intact: {found[-1][1]}' if found else 'no checkpoint yet'}"

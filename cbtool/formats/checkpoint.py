"""The checkpoint directory (docs/formats.md "Checkpoint"): cbtool.json + safetensors files, no pickle.

Writing builds the whole directory beside the target and swaps it in with renames, so a reader
sees the old checkpoint or the new one, never a mixture; cbtool.json carries a sha256 per file and
loading refuses any mismatch (hash, shape, version, missing key) with a `UserError` (exit 2).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cbtool.errors import UserError
from cbtool.formats import schema
from cbtool.formats.checkpoint_names import CODEBOOKS, FORMAT, FORMAT_VERSION, META, MODEL, TRAIN_STATE  # noqa: F401
from cbtool.formats.schema import read_versioned_json
from cbtool.model.sites import BuiltinLocator, CodebookModel, CodebookSpec
from cbtool.model.transformer import ModelConfig, Transformer
from cbtool.tasks.base import Task
from cbtool.tasks.text import TextTask
from cbtool.tasks.tokfsm import TokFSM
from cbtool.util import signals, strict_json
from cbtool.util.files import atomic_write_bytes, atomic_write_text, current_umask, sha256_file
from cbtool.util.limits import MAX_ELEMENTS
from cbtool.version import __version__


@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, cbtool.json, the model with its codebooks, and its task."""

    path: Path
    meta: dict[str, Any]
    model: CodebookModel
    task: Task
    train_state: dict[str, torch.Tensor] | None = None

    @property
    def sha256(self) -> str:
        """Identity of the checkpoint: hash of its cbtool.json (which hashes every file)."""
        return sha256_file(self.path / META)


def save_checkpoint(
    out: Path,
    model: CodebookModel,
    meta: dict[str, Any],
    save_base: bool = True,
    train_state: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write a checkpoint directory atomically. `meta` holds model/tokenizer/task/training.

    `extra_files` (name -> bytes, e.g. tokenizer.json) are written and hashed like the rest. Only the files
    cbtool owns are replaced: anything else in the directory (a user's notes, a sub-folder) is kept, and a
    symlinked `out` is written where it points."""
    out = real_target(Path(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a checkpoint follows the umask
    except OSError as e:
        raise UserError(f"cannot write checkpoint to {out}: {e.strerror or e}") from None
    try:
        tensors = {s.tensor_name: model.codebook(s).codes.detach().cpu().contiguous() for s in model.specs}
        save_file(tensors, str(tmp / CODEBOOKS))
        files = [CODEBOOKS]
        if save_base:
            state = _unshared(model.base.state_dict())
            save_file(state, str(tmp / MODEL))
            files.append(MODEL)
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(tmp / name, data)
            files.append(name)
        if train_state is not None:
            save_file({k: v.cpu().contiguous() for k, v in train_state.items()}, str(tmp / TRAIN_STATE))
            files.append(TRAIN_STATE)
        mode = 0o666 & ~current_umask()
        for name in files:  # the safetensors writer makes its files 0600 (a temp file renamed): follow the umask
            os.chmod(tmp / name, mode)
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cbtool_version": __version__,
            **meta,
            "codebooks": [s.to_dict() for s in model.specs],
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        atomic_write_text(tmp / META, strict_json.dumps(full, indent=2))
        with signals.deferred():  # Ctrl-C waits for the renames: the old checkpoint or the new, never neither
            _swap_in(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint to {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors accepts: tied weights (e.g. embeddings = LM head) become separate copies."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def real_target(out: Path) -> Path:
    """Where a checkpoint at `out` really lives: a symlinked directory is written where it points."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def owned_files(path: Path) -> set[str]:
    """The entries of a checkpoint directory that cbtool wrote (and so may replace): cbtool.json, the files
    it lists, and the names cbtool writes. Everything else belongs to the user."""
    names = {META, CODEBOOKS, MODEL, TRAIN_STATE, "tokenizer.json", "metrics.jsonl"}
    try:
        listed = json.loads((path / META).read_text(encoding="utf-8")).get("files")
        names.update(n for n in listed if isinstance(n, str) and "/" not in n and not n.startswith("."))
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        pass
    return names


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the new directory into place; the user's own entries of the old one move into the new one."""
    if out.exists() and not (out / META).is_file() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a cbtool checkpoint; refusing to replace it")
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:  # put the previous checkpoint back rather than leave none
            os.rename(old, out)
        raise
    if old is not None:
        owned = owned_files(old)
        for entry in old.iterdir():
            if entry.name not in owned and not (out / entry.name).exists():
                os.rename(entry, out / entry.name)
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swap(path: Path) -> bool:
    """A writer killed between the two renames of `_swap_in` leaves no checkpoint at `path`, only the
    previous one at `.NAME.old-PID`: when that writer is gone, rename it back. Returns True if it did."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    prefix = f".{path.name}.old-"
    for old in sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix)):
        pid = old.name[len(prefix):]
        if not pid.isdigit() or not (old / META).is_file():
            continue
        try:
            os.kill(int(pid), 0)
            if int(pid) != os.getpid():
                continue  # its writer is alive and about to finish the swap
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue
        try:
            os.rename(old, path)
        except OSError:
            return False
        return True
    return False


def read_meta(path: Path) -> dict[str, Any]:
    """Read and structurally validate cbtool.json; every problem is one UserError line."""
    path = Path(path)
    if not path.exists():
        recover_interrupted_swap(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist (train one with `cbtool train`)")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory")
    meta_path = path / META
    if not meta_path.is_file():
        raise UserError(f"{path} is not a cbtool checkpoint: no {META}")
    meta = read_versioned_json(meta_path, FORMAT, FORMAT_VERSION, "checkpoint", schema.CHECKPOINT)
    for key, kind in (("model", dict), ("codebooks", list), ("files", dict)):
        if not isinstance(meta.get(key), kind):
            raise UserError(f"{meta_path}: missing or malformed key {key!r}")
    return meta


def _verify_files(path: Path, meta: dict[str, Any]) -> None:
    for name, digest in meta["files"].items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise UserError(f"{path / META}: file name {name!r} points outside the checkpoint")
        f = path / name
        if not f.is_file():
            raise UserError(f"checkpoint {path} is missing {name}")
        if sha256_file(f) != digest:
            raise UserError(f"checkpoint {path}: {name} does not match its sha256 (corrupt or changed)")


def _specs(meta: dict[str, Any], where: Path) -> list[CodebookSpec]:
    specs = []
    try:
        for d in meta["codebooks"]:
            specs.append(CodebookSpec.from_dict(d))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where / META}: malformed codebook list ({e})") from None
    return specs


def _load_tensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {f}: {e}") from None


def check_values(where: Path, tensors: dict[str, torch.Tensor], real: bool = True) -> None:
    """Refuse (one `UserError` line) tensors a model cannot compute with: complex or integer where real
    weights belong (`real`), and NaN or infinite values in any floating tensor."""
    for name, t in tensors.items():
        if t.is_complex() or (real and not t.is_floating_point()):
            raise UserError(f"checkpoint file {where}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}; "
                            f"weights must be real floating-point numbers")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise UserError(f"checkpoint file {where}: tensor {name} holds NaN or infinite values")


def build_base(
    meta: dict[str, Any], where: Path, state: dict[str, torch.Tensor] | None = None
) -> tuple[torch.nn.Module, BuiltinLocator]:
    """The base model of a checkpoint; a built-in one is checked against `state` (its saved weights)
    on the meta device first, so a config edited to absurd sizes is refused before allocating."""
    model_meta = meta["model"]
    if model_meta.get("kind") == "hf":  # a local Hugging Face model referenced by path + content hash
        from cbtool.model.hf import build_base_from_meta

        return build_base_from_meta(meta, where)  # type: ignore[return-value]
    if model_meta.get("kind") != "builtin":
        raise UserError(f"{where / META}: unsupported model kind {model_meta.get('kind')!r}")
    try:
        cfg = ModelConfig(**model_meta["config"])
        if min(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.d_mlp) < 1:
            raise ValueError("sizes must be positive")
        with torch.device("meta"):  # shapes only: nothing is allocated
            shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: sizes overflow
        raise UserError(f"{where / META}: malformed model config ({e})") from None
    if state is not None and shapes != {k: tuple(v.shape) for k, v in state.items()}:
        raise UserError(f"checkpoint {where}: {MODEL} does not fit the model config in {META}")
    if sum(math.prod(s) for s in shapes.values()) > MAX_ELEMENTS:
        raise UserError(f"{where / META}: the model config is absurdly large")
    base = Transformer(cfg)
    return base, BuiltinLocator(base)


TASKS: dict[str, Callable[[dict[str, Any], Path], Task]] = {"tokfsm": TokFSM.from_meta, "text": TextTask.from_meta}


def build_task(meta: dict[str, Any], where: Path) -> Task:
    """The checkpoint's task, by the `name` of cbtool.json's "task" (cbtool/tasks/base.py)."""
    task = meta.get("task")
    if not isinstance(task, dict):
        raise UserError(f"malformed task in {META}: {task!r}")
    make = TASKS.get(task.get("name"))  # type: ignore[arg-type]
    if make is None:
        raise UserError(f"{where / META}: unknown task {task.get('name')!r} (this cbtool knows {', '.join(TASKS)})")
    return make(meta, where)


def _codebook_tensors(path: Path, meta: dict[str, Any]) -> tuple[list[CodebookSpec], dict[str, torch.Tensor]]:
    """The checkpoint's codebook specs and tensors (keyed by tensor name), each checked against cbtool.json."""
    if CODEBOOKS not in meta["files"]:
        raise UserError(f"checkpoint {path} lists no {CODEBOOKS}")
    specs = _specs(meta, path)
    codes = _load_tensors(path / CODEBOOKS)
    for spec in specs:
        t = codes.get(spec.tensor_name)
        expected = (spec.groups, spec.num_codes, spec.dim)
        if t is None:
            raise UserError(f"checkpoint {path}: {CODEBOOKS} lacks tensor {spec.tensor_name}")
        if tuple(t.shape) != expected:
            raise UserError(
                f"checkpoint {path}: {spec.tensor_name} has shape {tuple(t.shape)}, cbtool.json says {expected}"
            )
    check_values(path / CODEBOOKS, {s.tensor_name: codes[s.tensor_name] for s in specs})
    return specs, codes


def load_codebooks(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's code vectors, (groups, C, dim) per tensor name (`CodebookSpec.tensor_name`), checked as
    `load_checkpoint` checks them (hashes, shapes) but without building the model: a pretrained base takes seconds
    to load, its code vectors milliseconds."""
    path = Path(path)
    meta = read_meta(path)
    _verify_files(path, meta)
    return _codebook_tensors(path, meta)[1]


def load_checkpoint(path: Path, device: str | torch.device = "cpu", with_train_state: bool = False) -> Checkpoint:
    path = Path(path)
    meta = read_meta(path)
    _verify_files(path, meta)
    specs, codes = _codebook_tensors(path, meta)  # before the model (and its codebooks) is allocated
    task = build_task(meta, path)
    state = _load_tensors(path / MODEL) if MODEL in meta["files"] else None
    if state is not None:
        check_values(path / MODEL, state)
    base, locator = build_base(meta, path, state)
    if state is not None:
        try:
            base.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"checkpoint {path}: {MODEL} does not fit the model config ({first})") from None
    model = CodebookModel(base, locator, specs)
    for spec in specs:
        with torch.no_grad():
            model.codebook(spec).codes.copy_(codes[spec.tensor_name])
    train_state = None
    if with_train_state and TRAIN_STATE in meta["files"]:
        train_state = _load_tensors(path / TRAIN_STATE)
    model.to(device).eval()
    return Checkpoint(path, meta, model, task, train_state)

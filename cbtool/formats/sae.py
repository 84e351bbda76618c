"""Sparse autoencoders (SAEs) read from SAELens and sparsify directories, as sparse dictionaries cbtool can use
like codebooks.

A codebook picks, per token, the top-k of C code vectors; an SAE picks k of its d_sae latents, so the same code
store and analysis commands work on it: the latent ids are the codes, the decoder rows (`W_dec`, [d_sae, d_in])
are the code vectors, and each selected code also carries its activation.

Formats read (weights from safetensors only; nothing is ever unpickled):

* SAELens (`SAE.save_model`): a directory holding `cfg.json` and `sae_weights.safetensors`. Architectures
  `standard` (ReLU), `topk`, `jumprelu` and `gated`; version 6 configs (hook name in `metadata`) and older ones
  (`hook_point` / `hook_name` at the top level, `activation_fn_str` "relu" or "topk" with
  `activation_fn_kwargs: {"k": ...}`). Of `normalize_activations` only "none" is read: "expected_average_only_in"
  and "covariance_whitening" need statistics that the directory does not hold (SAELens folds them into the
  weights when training ends), "layer_norm" and "constant_norm_rescale" put the latents in a per-token
  normalised space whose decoder rows are not directions of the model's activations.
* sparsify (`SparseCoder.save_to_disk`): a hookpoint folder named by the module path (`layers.10.mlp`) holding
  `cfg.json` and `sae.safetensors`, or a run directory holding exactly one such folder. Activations `topk` and
  `groupmax`. Transcoders (`transcode: true`) are refused: their output predicts another activation, it is not
  a reconstruction of their input.

k: TopK SAEs (SAELens `topk`, sparsify `topk` / `groupmax`) select exactly their own k latents per token
(`k_fixed`); some of the k activations can be 0 when fewer latents are positive. The variable-L0 architectures
(`standard`, `jumprelu`, `gated`) activate any number of latents: cbtool keeps the `k_max` largest
(`DEFAULT_K_MAX` = 32 unless the caller chooses) and drops the rest; `truncation_stats` measures on given
activations how many of a token's nonzero latents, and what share of their activation mass, that drops.

Selection order: `encode` returns the k latents by activation, largest first, ties by ascending id; slots whose
activation is 0 (fewer than k positive latents) hold the smallest ids not already selected, so the output is
deterministic.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from cbtool.errors import UserError
from cbtool.util.files import read_text, sha256_file

FORMATS = ("saelens", "sparsify")
CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
SPARSIFY_ACTIVATIONS = ("topk", "groupmax")
FIXED_K = {"topk", "groupmax"}  # architectures that select exactly k latents themselves
DEFAULT_K_MAX = 32
MAX_LATENTS = 1 << 24  # ids are ranked through float32 scores; exact up to 2^24
CHUNK_ELEMENTS = 1 << 24  # rows of x are encoded in chunks of at most this many [rows x d_sae] scores

_NORMALIZE_OK = ("none",)
_NORMALIZE_WHY = {
    "expected_average_only_in": "its scaling factor is not stored in the directory (fold it into the weights "
                                "with SAELens fold_activation_norm_scaling_factor and save again)",
    "covariance_whitening": "its whitening statistics are not stored in the directory (fold them with SAELens "
                            "fold_activation_whitening and save again)",
    "layer_norm": "its latents live in a per-token layer-normalised space, so its decoder rows are not "
                  "directions of the model's activations",
    "constant_norm_rescale": "its latents live in a per-token rescaled space, so its decoder rows are not "
                             "directions of the model's activations",
}
_TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


@dataclass
class SparseDictionary:
    """An SAE as cbtool uses it. Weights are float32 on the CPU; `W_enc` is [d_in, d_sae] whatever the format
    stored, `W_dec` [d_sae, d_in]. Build one with `load_sae`."""

    path: Path
    format: str  # "saelens" | "sparsify"
    architecture: str  # SAELens architecture, or sparsify activation ("topk" | "groupmax")
    d_in: int
    d_sae: int
    k: int  # latents kept per token: the SAE's own k if k_fixed, else the caller's k_max
    k_fixed: bool
    hook: str  # hook name (SAELens) or module path (sparsify), as the file gives it
    head_index: int | None
    site: str  # cbtool site name (`site_for_hook`)
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    apply_b_dec_to_input: bool = True
    threshold: Tensor | None = None  # jumprelu
    b_gate: Tensor | None = None  # gated
    r_mag: Tensor | None = None
    b_mag: Tensor | None = None
    W_skip: Tensor | None = None  # sparsify skip connection, [d_in, d_in] applied as x @ W_skip.T
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    model_name: str | None = None
    folded: list[str] = field(default_factory=list)  # what was folded into the weights at load time

    def to(self, device: torch.device | str) -> SparseDictionary:
        """Move every weight to `device` (in place); returns self."""
        for name, value in list(self.__dict__.items()):
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        return self

    @property
    def code_vectors(self) -> Tensor:
        """The decoder rows, [d_sae, d_in]: latent i writes code_vectors[i] * activation."""
        return self.W_dec

    def identity(self) -> dict[str, Any]:
        """What a code store records to name this SAE: format, architecture, each file's sha256, sizes, k and
        the hook."""
        return {
            "format": self.format, "architecture": self.architecture, "files": dict(self.files),
            "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k, "k_fixed": self.k_fixed,
            "hook": self.hook, "head_index": self.head_index, "site": self.site,
            "model_name": self.model_name, "folded": list(self.folded),
        }

    # -- encoding ---------------------------------------------------------------------------------------

    def _input(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected activations of shape [n, {self.d_in}], got {list(x.shape)}")
        return x.to(device=self.W_enc.device, dtype=torch.float32)

    def _scores(self, x: Tensor) -> Tensor:
        """[n, d_sae] activations before any top-k: ReLU / JumpReLU / gated activations for the variable-L0
        architectures (these are the SAE's own activations); ReLU pre-activations for topk (the SAE keeps the k
        largest); for groupmax, each group's maximum at its position and 0 elsewhere."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.architecture == "gated":
            assert self.b_gate is not None and self.r_mag is not None and self.b_mag is not None
            gate = (x @ self.W_enc + self.b_gate) > 0
            mag = torch.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            return mag * gate
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return torch.relu(pre) * (pre > self.threshold)
        post = torch.relu(pre)
        if self.architecture == "groupmax":
            vals, idx = post.unflatten(-1, (self.k, -1)).max(dim=-1)
            idx = idx + torch.arange(0, self.d_sae, self.d_sae // self.k, device=idx.device)
            return torch.zeros_like(post).scatter_(1, idx, vals)
        return post

    def _chunks(self, n: int) -> range:
        return range(0, n, max(1, CHUNK_ELEMENTS // self.d_sae))

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Activations [n, d_in] -> (ids int64 [n, k], acts float32 [n, k]), largest activation first (module
        docstring: ties, zero slots)."""
        x = self._input(x)
        step = self._chunks(x.shape[0]).step
        out = [select_top(self._scores(x[i:i + step]), self.k) for i in range(0, x.shape[0], step)]
        if not out:
            return (torch.zeros(0, self.k, dtype=torch.int64), torch.zeros(0, self.k))
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    @torch.no_grad()
    def latent_acts(self, x: Tensor) -> Tensor:
        """The SAE's own dense activations [n, d_sae], before cbtool's k_max cap (for TopK SAEs: k nonzero at
        most). Memory: n * d_sae floats."""
        x = self._input(x)
        scores = self._scores(x)
        if not self.k_fixed:
            return scores
        ids, acts = select_top(scores, self.k)
        return torch.zeros_like(scores).scatter_(1, ids, acts)

    @torch.no_grad()
    def decode_latents(self, ids: Tensor, acts: Tensor) -> Tensor:
        """sum_j acts[:, j] * W_dec[ids[:, j]] -> [n, d_in], without any bias."""
        if ids.shape != acts.shape or ids.dim() != 2:
            raise ValueError(f"ids {list(ids.shape)} and acts {list(acts.shape)} must both be [n, k]")
        return torch.einsum("nk,nkd->nd", acts.to(torch.float32), self.W_dec[ids])

    @torch.no_grad()
    def reconstruct(self, ids: Tensor, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """The SAE's output for these latents: decode_latents + b_dec (+ x @ W_skip.T for a sparsify SAE with a
        skip connection, which needs the input x)."""
        y = self.decode_latents(ids, acts) + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError(f"{self.path}: this SAE has a skip connection; reconstruct needs the input x")
            y = y + self._input(x) @ self.W_skip.T
        return y


def select_top(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of nonnegative scores [n, m] per row -> (ids, acts), largest first, ties by ascending id;
    zero slots get the smallest ids not selected."""
    rank = torch.where(scores > 0, scores, -1.0 - torch.arange(scores.shape[1], dtype=scores.dtype,
                                                                 device=scores.device))
    ids = rank.topk(k, dim=1).indices
    ids = ids.sort(dim=1).values
    acts = scores.gather(1, ids)
    order = torch.argsort(-acts, dim=1, stable=True)
    return ids.gather(1, order), acts.gather(1, order)


class TruncationCounter:
    """`truncation_stats` accumulated batch by batch (`cbtool embed --sae` counts a whole corpus); `add` per batch,
    `counts()` the raw sums (JSON-able, so shards can be summed), `stats(counts)` the shares."""

    KEYS = ("tokens", "nnz", "dropped", "truncated", "max_l0", "total_mass", "kept_mass")

    def __init__(self, sae: SparseDictionary, skip_fixed: bool = True) -> None:
        """skip_fixed: for a TopK SAE only count tokens (it drops nothing; its L0 is not measured)."""
        self.sae, self.skip = sae, skip_fixed and sae.k_fixed
        self.sums: dict[str, float] = dict.fromkeys(self.KEYS, 0)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        sae, c = self.sae, self.sums
        xs = sae._input(x)
        if self.skip:  # a TopK SAE keeps all it selects: nothing dropped, L0 <= k
            c["tokens"] += xs.shape[0]
            return
        step = sae._chunks(xs.shape[0]).step
        for i in range(0, xs.shape[0], step):
            a = sae.latent_acts(xs[i:i + step])
            l0 = (a > 0).sum(dim=1)
            _, kept = select_top(a, sae.k)
            c["tokens"] += a.shape[0]
            c["nnz"] += int(l0.sum())
            c["dropped"] += int((l0 - sae.k).clamp(min=0).sum())
            c["truncated"] += int((l0 > sae.k).sum())
            c["max_l0"] = max(c["max_l0"], int(l0.max()) if l0.numel() else 0)
            c["total_mass"] += float(a.double().sum())
            c["kept_mass"] += float(kept.double().sum())

    def counts(self) -> dict[str, float]:
        return dict(self.sums)

    @staticmethod
    def merge(parts: list[dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = dict.fromkeys(TruncationCounter.KEYS, 0)
        for p in parts:
            for key in TruncationCounter.KEYS:
                v = p.get(key, 0)
                out[key] = max(out[key], v) if key == "max_l0" else out[key] + v
        return out

    @staticmethod
    def stats(c: dict[str, float], k: int, skipped: bool) -> dict[str, Any]:
        """The shares of merged counts; `skipped`: counted with skip_fixed on a TopK SAE (L0 not measured)."""
        n, nnz = int(c["tokens"]), c["nnz"]
        if skipped:
            return {"tokens": n, "k": k, "mean_l0": None, "max_l0": None, "dropped_latent_share": 0.0,
                    "dropped_mass_share": 0.0, "tokens_truncated_share": 0.0}
        return {
            "tokens": n,
            "k": k,
            "mean_l0": nnz / n if n else 0.0,
            "max_l0": int(c["max_l0"]),
            "dropped_latent_share": c["dropped"] / nnz if nnz else 0.0,
            "dropped_mass_share": (max(0.0, 1.0 - c["kept_mass"] / c["total_mass"]) if c["total_mass"] > 0
                                   else 0.0),
            "tokens_truncated_share": c["truncated"] / n if n else 0.0,
        }


@torch.no_grad()
def truncation_stats(sae: SparseDictionary, x: Tensor) -> dict[str, float]:
    """What keeping only `sae.k` latents per token drops, measured on activations x [n, d_in]:
    `dropped_latent_share` (dropped nonzero latents / all nonzero latents), `dropped_mass_share` (their summed
    activation / the summed activation of all), `tokens_truncated_share` (tokens with more than k nonzero),
    `mean_l0` and `max_l0` (nonzero latents per token). All 0 for a TopK SAE."""
    counter = TruncationCounter(sae, skip_fixed=False)
    counter.add(x)
    return TruncationCounter.stats(counter.counts(), sae.k, False)


# -- hook names -> cbtool sites ---------------------------------------------------------------------------

_HF_PREFIX = r"(?:(?:model|gpt_neox|transformer|base_model|language_model)\.)*"
_HF_RE = re.compile(rf"^{_HF_PREFIX}(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attention|attn))?$")
_TL_RE = re.compile(r"^blocks\.(\d+)\.(hook_mlp_out|hook_resid_post|hook_resid_pre|hook_attn_out|attn\.hook_z)$")
HOOK_FORMS = ("blocks.L.hook_resid_post", "blocks.L.hook_resid_pre (L > 0)", "blocks.L.hook_mlp_out",
              "blocks.L.hook_attn_out", "blocks.L.attn.hook_z", "layers.L / model.layers.L / gpt_neox.layers.L / "
              "transformer.h.L / h.L [.mlp | .self_attn | .attention | .attn]")


def site_for_hook(name: str, head_index: int | None = None) -> str:
    """A TransformerLens hook name or Hugging Face module path -> cbtool site: `L.resid` (a block's output),
    `L.mlp`, `L.attn`, `L.attn.hH` (head H's input to the attention output projection: `attn.hook_z` with a
    head index) or `L.attn.heads` (`attn.hook_z` without one: all heads side by side, as SAELens's
    `reshape_activations: hook_z` reads them). `blocks.L.hook_resid_pre` is the previous block's output."""
    if head_index is not None and (isinstance(head_index, bool) or not isinstance(head_index, int)
                                   or head_index < 0):
        raise UserError(f"hook {name!r}: head index {head_index!r} is not a nonnegative integer")
    m = _TL_RE.match(name)
    if m:
        layer, what = int(m.group(1)), m.group(2)
        if what != "attn.hook_z" and head_index is not None:
            raise UserError(f"hook {name!r}: a head index ({head_index}) only applies to blocks.L.attn.hook_z")
        if what == "attn.hook_z":
            return f"{layer}.attn.heads" if head_index is None else f"{layer}.attn.h{head_index}"
        if what == "hook_resid_pre":
            if layer == 0:
                raise UserError(f"hook {name!r} is the embedding output, which has no cbtool site")
            return f"{layer - 1}.resid"
        return {"hook_mlp_out": f"{layer}.mlp", "hook_resid_post": f"{layer}.resid",
                "hook_attn_out": f"{layer}.attn"}[what]
    m = _HF_RE.match(name)
    if m and head_index is None:
        layer, sub = int(m.group(1)), m.group(2)
        return f"{layer}.resid" if sub is None else (f"{layer}.mlp" if sub == "mlp" else f"{layer}.attn")
    if m:
        raise UserError(f"hook {name!r}: a head index ({head_index}) only applies to blocks.L.attn.hook_z")
    raise UserError(f"hook {name!r} has no cbtool site; known forms: {', '.join(HOOK_FORMS)}")


def check_d_in(sae: SparseDictionary, d_model: int, site: str | None = None, n_head: int | None = None) -> None:
    """UserError unless the SAE's d_in equals the width of `site` (default: the SAE's own site) in a model of
    width d_model: d_model for `L.resid`, `L.mlp`, `L.attn` and `L.attn.heads`, d_model / n_head for a head."""
    site = sae.site if site is None else site
    if re.fullmatch(r"\d+\.attn\.h\d+", site):
        if not n_head:
            raise ValueError("check_d_in: a head site needs n_head")
        width = d_model // n_head
    else:
        width = d_model
    if sae.d_in != width:
        raise UserError(f"{sae.path}: the SAE reads {sae.d_in}-wide activations but site {site} of this model is "
                        f"{width} wide")


# -- loading ----------------------------------------------------------------------------------------------

def load_sae(path: str | Path, k_max: int | None = None) -> SparseDictionary:
    """Read an SAELens or sparsify SAE directory (module docstring). k_max: latents kept per token for the
    variable-L0 architectures (default DEFAULT_K_MAX); a TopK SAE keeps its own k, and a different k_max is
    refused. Every problem with the files is one UserError line naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"SAE {path} does not exist")
    if not path.is_dir():
        raise UserError(f"SAE {path} is not a directory (an SAELens or sparsify SAE is a folder)")
    fmt, path = locate_sae(path)
    if k_max is not None and (isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1):
        raise UserError(f"k_max must be a positive integer, not {k_max!r}")
    return _load_saelens(path, k_max) if fmt == "saelens" else _load_sparsify(path, k_max)


def locate_sae(path: Path) -> tuple[str, Path]:
    """(format, SAE folder) for an SAE folder or a folder holding exactly one (a sparsify run directory with one
    hookpoint); UserError for anything else, listing the SAEs when a folder holds several."""
    has_cfg = (path / CFG).exists()
    if (path / SAELENS_WEIGHTS).exists():
        return "saelens", path
    if (path / SPARSIFY_WEIGHTS).exists():
        return "sparsify", path
    if has_cfg:
        raise UserError(f"SAE {path}: {CFG} but neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} "
                        f"(sparsify)")
    try:
        subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CFG).exists()
                      and ((p / SPARSIFY_WEIGHTS).exists() or (p / SAELENS_WEIGHTS).exists()))
    except OSError as e:
        raise UserError(f"cannot list SAE folder {path}: {e.strerror or e}") from None
    if len(subs) == 1:
        return locate_sae(subs[0])
    if subs:
        shown = ", ".join(str(p) for p in subs[:8]) + (f", ... ({len(subs)} in all)" if len(subs) > 8 else "")
        raise UserError(f"SAE folder {path} holds {len(subs)} SAEs (one per hookpoint); name one: {shown}")
    raise UserError(f"{path} is neither an SAELens SAE ({CFG} + {SAELENS_WEIGHTS}) nor a sparsify SAE "
                    f"({CFG} + {SPARSIFY_WEIGHTS}, or a run folder holding one such hookpoint folder)")


def _read_cfg(path: Path) -> dict[str, Any]:
    f = path / CFG
    if not f.exists():
        raise UserError(f"SAE {path} has no {CFG}")
    text = read_text(f, "SAE config")

    def bad_constant(c: str) -> Any:
        raise ValueError(f"{c} is not a number")

    try:
        cfg = json.loads(text, parse_constant=bad_constant)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{f} is not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f} is not a JSON object")
    return cfg


def _get_int(cfg: dict, key: str, where: Path, default: Any = ..., low: int = 1) -> int:
    v = cfg.get(key, default)
    if v is ...:
        raise UserError(f"{where}: missing key {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v < low or v > MAX_LATENTS * 64:
        raise UserError(f"{where}: {key!r} must be an integer >= {low}, not {v!r}")
    return v


def _get_bool(cfg: dict, key: str, where: Path, default: bool) -> bool:
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise UserError(f"{where}: {key!r} must be true or false, not {v!r}")
    return v


def _read_weights(f: Path) -> dict[str, Tensor]:
    try:
        st = os.stat(f)
    except OSError as e:
        raise UserError(f"cannot read SAE weights {f}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"SAE weights {f} is not a regular file")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read {f} as safetensors: {str(e).splitlines()[0][:200]}") from None


def _tensor(weights: dict[str, Tensor], name: str, shape: tuple[int, ...], f: Path) -> Tensor:
    if name not in weights:
        raise UserError(f"{f}: missing tensor {name!r} (has {', '.join(sorted(weights)) or 'none'})")
    t = weights[name]
    if not t.is_floating_point():
        raise UserError(f"{f}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, not a float type")
    if tuple(t.shape) != shape:
        raise UserError(f"{f}: tensor {name!r} has shape {list(t.shape)} but {CFG} implies {list(shape)}")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise UserError(f"{f}: tensor {name!r} holds NaN or infinite values")
    return t.contiguous()


def _check_k(k: int, d_sae: int, where: Path, key: str = "k") -> None:
    if k > d_sae:
        raise UserError(f"{where}: {key} = {k} exceeds the number of latents ({d_sae})")


def _resolve_k(fixed_k: int | None, k_max: int | None, d_sae: int, where: Path) -> tuple[int, bool]:
    if fixed_k is not None:
        if k_max is not None and k_max != fixed_k:
            raise UserError(f"{where}: this TopK SAE selects exactly k = {fixed_k} latents per token; "
                            f"k_max = {k_max} does not apply")
        return fixed_k, True
    k = DEFAULT_K_MAX if k_max is None else k_max
    return min(k, d_sae), False


def _check_dtype_name(cfg: dict, where: Path) -> None:
    d = cfg.get("dtype")
    if d is None:
        return
    name = str(d).removeprefix("torch.")
    if name not in ("float32", "float", "float16", "half", "bfloat16", "float64", "double"):
        raise UserError(f"{where}: dtype {d!r} is not a float type")


def _load_saelens(path: Path, k_max: int | None) -> SparseDictionary:
    cfg = _read_cfg(path)
    where = path / CFG
    wf = path / SAELENS_WEIGHTS
    meta = cfg.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise UserError(f"{where}: 'metadata' is not a JSON object")
    arch = cfg.get("architecture")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if arch in _TRANSCODER_ARCHITECTURES or meta.get("hook_name_out") or cfg.get("hook_name_out"):
        raise UserError(f"{where}: a transcoder ({arch}) is not an SAE: its output predicts another activation, "
                        f"not a reconstruction of its input")
    if arch is None or (arch == "standard" and act_fn == "topk"):  # SAELens < 6 configs
        arch = "topk" if act_fn == "topk" else "standard"
    if arch not in SAELENS_ARCHITECTURES:
        raise UserError(f"{where}: architecture {arch!r} is not supported "
                        f"(cbtool reads {', '.join(SAELENS_ARCHITECTURES)})")
    if arch in ("standard", "topk") and act_fn not in (None, "relu", "topk"):
        raise UserError(f"{where}: activation function {act_fn!r} is not supported (relu or topk)")
    d_in = _get_int(cfg, "d_in", where)
    d_sae = _get_int(cfg, "d_sae", where)
    if d_sae > MAX_LATENTS:
        raise UserError(f"{where}: d_sae = {d_sae} is more latents than cbtool handles ({MAX_LATENTS})")
    _check_dtype_name(cfg, where)
    norm = cfg.get("normalize_activations", "none")
    if norm is None or norm is False:
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    if norm not in _NORMALIZE_OK:
        why = _NORMALIZE_WHY.get(norm, "unknown normalisation")
        raise UserError(f"{where}: normalize_activations {norm!r} is not supported: {why}")
    fixed_k = None
    if arch == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise UserError(f"{where}: 'activation_fn_kwargs' is not a JSON object")
        fixed_k = _get_int(cfg, "k", where, kwargs.get("k", ...))
        _check_k(fixed_k, d_sae, where)
    k, k_fixed = _resolve_k(fixed_k, k_max, d_sae, where)

    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not isinstance(hook, str) or not hook:
        raise UserError(f"{where}: no hook name (metadata.hook_name, hook_name or hook_point)")
    head = meta.get("hook_head_index", cfg.get("hook_head_index", cfg.get("hook_point_head_index")))
    try:
        site = site_for_hook(hook, head)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None

    weights = _read_weights(wf)
    W_enc = _tensor(weights, "W_enc", (d_in, d_sae), wf)
    W_dec = _tensor(weights, "W_dec", (d_sae, d_in), wf)
    b_dec = _tensor(weights, "b_dec", (d_in,), wf)
    extra: dict[str, Tensor | None] = {}
    if arch == "gated":
        for name in ("b_gate", "r_mag", "b_mag"):
            extra[name] = _tensor(weights, name, (d_sae,), wf)
        b_enc = torch.zeros(d_sae)
    else:
        b_enc = _tensor(weights, "b_enc", (d_sae,), wf)
    if arch == "jumprelu":
        extra["threshold"] = _tensor(weights, "threshold", (d_sae,), wf)
    folded = []
    if "scaling_factor" in weights:  # SAELens < 6 finetuning scaling factor: scales the acts before decoding
        s = _tensor(weights, "scaling_factor", (d_sae,), wf)
        if not torch.equal(s, torch.ones_like(s)):
            W_dec = W_dec * s[:, None]
            folded.append("scaling_factor")
    if arch == "topk" and _get_bool(cfg, "rescale_acts_by_decoder_norm", where, False):
        # SAELens multiplies the pre-activations by ||W_dec_i|| and divides the acts by it before decoding;
        # folding the norms in gives the same activations and reconstruction from unit decoder rows
        norms = W_dec.norm(dim=1)
        if not (norms > 0).all():
            raise UserError(f"{wf}: rescale_acts_by_decoder_norm with a zero decoder row")
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        folded.append("rescale_acts_by_decoder_norm")
    model_name = meta.get("model_name", cfg.get("model_name"))
    return SparseDictionary(
        path=path, format="saelens", architecture=arch, d_in=d_in, d_sae=d_sae, k=k, k_fixed=k_fixed,
        hook=hook, head_index=head, site=site, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
        apply_b_dec_to_input=_get_bool(cfg, "apply_b_dec_to_input", where, True),
        files={CFG: sha256_file(where), SAELENS_WEIGHTS: sha256_file(wf)},
        model_name=model_name if isinstance(model_name, str) else None, folded=folded, **extra)


def _load_sparsify(path: Path, k_max: int | None) -> SparseDictionary:
    cfg = _read_cfg(path)
    where = path / CFG
    wf = path / SPARSIFY_WEIGHTS
    if _get_bool(cfg, "transcode", where, False):
        raise UserError(f"{where}: a transcoder (transcode: true) is not an SAE: its output predicts another "
                        f"activation, not a reconstruction of its input")
    act = cfg.get("activation", "topk")
    if act not in SPARSIFY_ACTIVATIONS:
        raise UserError(f"{where}: activation {act!r} is not supported (cbtool reads "
                        f"{', '.join(SPARSIFY_ACTIVATIONS)})")
    d_in = _get_int(cfg, "d_in", where)
    num_latents = _get_int(cfg, "num_latents", where, 0, low=0)
    d_sae = num_latents or d_in * _get_int(cfg, "expansion_factor", where, 32)
    if d_sae > MAX_LATENTS:
        raise UserError(f"{where}: {d_sae} latents is more than cbtool handles ({MAX_LATENTS})")
    fixed_k = _get_int(cfg, "k", where, 32)
    _check_k(fixed_k, d_sae, where)
    if act == "groupmax" and d_sae % fixed_k:
        raise UserError(f"{where}: groupmax needs the number of latents ({d_sae}) divisible by k ({fixed_k})")
    k, k_fixed = _resolve_k(fixed_k, k_max, d_sae, where)
    skip = _get_bool(cfg, "skip_connection", where, False)
    hook = path.resolve().name
    try:
        site = site_for_hook(hook)
    except UserError as e:
        raise UserError(f"{path}: hookpoint folder name: {e}") from None

    weights = _read_weights(wf)
    W_enc = _tensor(weights, "encoder.weight", (d_sae, d_in), wf).T.contiguous()
    b_enc = _tensor(weights, "encoder.bias", (d_sae,), wf)
    W_dec = _tensor(weights, "W_dec", (d_sae, d_in), wf)
    b_dec = _tensor(weights, "b_dec", (d_in,), wf)
    W_skip = _tensor(weights, "W_skip", (d_in, d_in), wf) if skip else None
    return SparseDictionary(
        path=path, format="sparsify", architecture=act, d_in=d_in, d_sae=d_sae, k=k, k_fixed=k_fixed,
        hook=hook, head_index=None, site=site, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
        apply_b_dec_to_input=True, W_skip=W_skip,
        files={CFG: sha256_file(where), SPARSIFY_WEIGHTS: sha256_file(wf)})


# -- the model an SAE reads ---------------------------------------------------------------------------

@dataclass
class SAEBase:
    """The model an SAE is applied to: `model(idx, past=None, start=None) -> (logits, cache)` like the built-in
    model, its `locator` (cbtool/model/sites.py), the task that tokenises text for it, and `spec`, its identity
    for a store's manifest."""

    model: torch.nn.Module
    locator: Any
    task: Any
    spec: dict[str, Any]


def open_base(path: str | Path, gguf_file: str | None = None, device: torch.device | str = "cpu",
              seq_len: int | None = None) -> SAEBase:
    """`--base-model`: a cbtool checkpoint directory (its model with the codebooks bypassed, its tokenizer or
    TokFSM task) or a local Hugging Face model directory (or a GGUF file in it), read offline. `seq_len`: tokens
    per document of a Hugging Face base's corpus (default 128, or the model's context when shorter)."""
    p = Path(path)
    from cbtool.formats.checkpoint import META, load_checkpoint

    if (p / META).is_file():
        if gguf_file is not None:
            raise UserError(f"--gguf-file applies to a Hugging Face model; {p} is a cbtool checkpoint")
        ckpt = load_checkpoint(p, device=device)
        ckpt.model.set_enabled(False)
        ckpt.model.eval()
        spec = {"kind": "cbtool", "path": str(ckpt.path.resolve()), "sha256": ckpt.sha256}
        return SAEBase(ckpt.model, ckpt.model.locator, ckpt.task, spec)
    from cbtool.model.hf import load_hf_model
    from cbtool.tasks.text import TextTask, load_hf_tokenizer

    adapter, locator, spec = load_hf_model(p, gguf_file, frozen=True)
    adapter.to(device)
    seq_len = min(128, adapter.config.block_size) if seq_len is None else seq_len
    task = TextTask(lambda: load_hf_tokenizer(p, gguf_file), None, "text", seq_len, "hf")
    return SAEBase(adapter, locator, task, spec)


def check_site(sae: SparseDictionary, base: SAEBase, site: str | None = None) -> tuple[str, dict[str, Any]]:
    """The site the SAE reads in `base` (`site` overrides the SAE's own), checked against the model's layers and
    widths (UserError), and its store manifest entry fields (layer, component, group, groups, dim)."""
    from cbtool.model.sites import parse_site

    name = sae.site if site is None else site.strip()
    layer, comp, head = parse_site(name, base.locator)
    n_head, d_model = base.locator.n_head, base.locator.d_model
    check_d_in(sae, d_model, name, n_head)
    if comp == "attn_heads" and head is not None:
        return name, {"layer": layer, "component": comp, "group": head, "groups": n_head, "dim": sae.d_in}
    component = "attn" if comp == "attn_heads" else comp  # L.attn.heads: all heads as one d_model-wide input
    return name, {"layer": layer, "component": component, "group": 0, "groups": 1, "dim": sae.d_in}

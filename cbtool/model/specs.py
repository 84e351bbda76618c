"""Codebook specs, sites and the built-in model's config, without torch: what a checkpoint's cbtool.json and a
store's manifest.json name. cbtool/model/sites.py and transformer.py re-export them beside the modules that use
torch; reading a store imports only this (docs/cli.md "Start-up")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cbtool.util.limits import MAX_CODES, MAX_ELEMENTS

COMPONENTS = ("attn_heads", "attn", "mlp", "resid")
_COMPONENT_WORDS = {"attn-heads": "attn_heads", "attn_heads": "attn_heads", "heads": "attn_heads",
                    "attn": "attn", "mlp": "mlp", "resid": "resid"}


@dataclass(frozen=True)
class CodebookSpec:
    """One codebook module: (layer, component) with its size. Serialised in cbtool.json."""

    layer: int
    component: str
    groups: int
    dim: int
    num_codes: int
    k: int

    @property
    def key(self) -> str:
        return f"{self.layer}.attn.heads" if self.component == "attn_heads" else f"{self.layer}.{self.component}"

    @property
    def tensor_name(self) -> str:
        return f"{self.key}.codes"

    @property
    def site_names(self) -> list[str]:
        if self.component == "attn_heads":
            return [f"{self.layer}.attn.h{h}" for h in range(self.groups)]
        return [self.key]

    @classmethod
    def from_dict(cls, d: dict) -> CodebookSpec:
        """A spec from its serialised form (cbtool.json "codebooks", manifest.json "sites"; other keys are
        ignored), checked: ValueError, TypeError or KeyError when an entry is malformed or absurdly large."""
        spec = cls(int(d["layer"]), str(d["component"]), int(d["groups"]), int(d["dim"]), int(d["num_codes"]),
                   int(d["k"]))
        if spec.component not in COMPONENTS or min(
            spec.groups, spec.dim, spec.num_codes, spec.k
        ) < 1 or spec.k > spec.num_codes:
            raise ValueError(f"bad codebook entry {d}")
        if spec.num_codes > MAX_CODES or spec.groups * spec.num_codes * spec.dim > MAX_ELEMENTS:
            raise ValueError(f"codebook {spec.groups}x{spec.num_codes}x{spec.dim} is absurdly large")
        return spec

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(key=self.key, sites=self.site_names, tensor=self.tensor_name, similarity="cosine")
        return d


@dataclass(frozen=True)
class Site:
    """A user-visible site: a codebook module and the group (head) within it."""

    name: str
    spec: CodebookSpec
    group: int

    @property
    def num_codes(self) -> int:
        return self.spec.num_codes


@dataclass
class ModelConfig:
    vocab_size: int = 11
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int = 512

    def to_dict(self) -> dict:
        return asdict(self)

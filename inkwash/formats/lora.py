"""LoRA files (Hu et al. 2021) in the kohya and the diffusers / PEFT layouts, merged into inkwash networks (U-Net,
MMDiT) and into transformers text encoders, and unmerged again.

Owns every LoRA key name:
- kohya (sd-scripts): `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `lora_te_` (`lora_te1_`,
  `lora_te2_`, `lora_te3_`) for text encoders; `<module>` is a module path with dots written as underscores, in
  diffusers' U-Net names for SD, BFL's names for FLUX and Stability's for SD3.
- diffusers / PEFT: `unet.` or `transformer.<module>.lora_A.weight` / `.lora_B.weight` (older files:
  `.lora.down.weight` / `.lora.up.weight`), `text_encoder.` / `text_encoder_2.` / `text_encoder_3.`, alphas from
  the safetensors metadata `lora_adapter_metadata` (PEFT's `lora_alpha`, `alpha_pattern`) or `.alpha` keys;
  `diffusion_model.<module>` (BFL / Stability names with PEFT suffixes, as several FLUX trainers write).

A LoRA layer adds `scale * alpha / rank * up @ down` to a weight. inkwash fuses projections (QKV, the FLUX single
blocks' input) and reorders some rows, so where a LoRA'd weight lands is not written down here: it is found by
running the model's own format converter (`formats.diffusers_*`, `formats.*_original`) on probe tensors whose
values name (source weight, row). Every LoRA key must land: unmatched ones raise one `UserError` listing them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from inkwash.errors import UserError

Rows = tuple[str, torch.Tensor, torch.Tensor]  # (our parameter, our rows, the source weight's rows)
RowMap = dict[str, list[Rows]]  # source weight name -> where its rows land

_CODE = 2**20  # probe value = source index * _CODE + row (exact in float64)
_KOHYA = re.compile(r"(lora_unet|lora_te[123]?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_PEFT = re.compile(
    r"(unet|transformer|diffusion_model|text_encoder(?:_[23])?)\.(.+)\."
    r"(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|alpha)"
)
_PART = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down", "lora_up.weight": "up",
         "lora_B.weight": "up", "lora.up.weight": "up", "alpha": "alpha"}  # fmt: skip
_COMPONENT = {"lora_unet": "net", "unet": "net", "transformer": "net", "diffusion_model": "net",
              "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
              "lora_te3": "text_encoder_3", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
              "text_encoder_3": "text_encoder_3"}  # fmt: skip


# ---------------------------------------------------------------------------- where weights land


def probe_row_map(ours: Mapping[str, torch.Tensor], to_source: Callable, from_source: Callable) -> RowMap:
    """For a converter pair (ours -> source names, source -> ours), where each row of each source weight lands in
    ours. `ours` may be on the meta device: only shapes are read, and probes are one column wide."""
    shapes = {k: v.shape for k, v in to_source(ours).items()}
    names = sorted(shapes)
    probes = {}
    for i, k in enumerate(names):
        rows = torch.arange(shapes[k][0], dtype=torch.float64) + i * _CODE
        probes[k] = rows.view(-1, *[1] * (len(shapes[k]) - 1))
    out: RowMap = {}
    for key, codes in from_source(probes).items():
        codes = codes.reshape(codes.shape[0], -1)[:, 0].long()  # [our rows]
        src, row = codes // _CODE, codes % _CODE
        for i in src.unique().tolist():
            our_rows = (src == i).nonzero().flatten()
            out.setdefault(names[i], []).append((key, our_rows, row[our_rows]))
    return out


def identity_row_map(module: nn.Module) -> RowMap:
    """A module addressed by its own parameter names (transformers text encoders)."""
    return {name: [(name, None, None)] for name, _ in module.named_parameters()}


def net_row_maps(net: nn.Module, schemes: tuple[str, ...] = ("diffusers", "original")) -> dict[str, RowMap]:
    """{scheme: RowMap} for an inkwash network, for the schemes asked: "diffusers" and, for an MMDiT, "original"
    (BFL / Stability names). A U-Net has diffusers' names only (kohya's SD files use them too)."""
    from inkwash.models.mmdit import MMDiT
    from inkwash.models.unet import UNet

    with torch.device("meta"):
        ours = {k: torch.empty(v.shape) for k, v in net.state_dict().items()}
    cfg = net.cfg
    if isinstance(net, UNet):
        from inkwash.formats.diffusers_unet import unet_state_dict_from_diffusers, unet_state_dict_to_diffusers

        return {"diffusers": probe_row_map(ours, lambda sd: unet_state_dict_to_diffusers(sd, cfg),
                                           unet_state_dict_from_diffusers)}  # fmt: skip
    if isinstance(net, MMDiT):
        from inkwash.formats import diffusers_flux as dflux
        from inkwash.formats import flux_original, sd3_original

        if cfg.axes_dim:  # FLUX
            to_d, from_d = dflux.flux_state_dict_to_diffusers, dflux.flux_state_dict_from_diffusers
            to_o, from_o = flux_original.flux_state_dict_to_original, flux_original.flux_state_dict_from_original
        else:
            to_d, from_d = dflux.sd3_state_dict_to_diffusers, dflux.sd3_state_dict_from_diffusers
            to_o, from_o = sd3_original.sd3_state_dict_to_original, sd3_original.sd3_state_dict_from_original
        maps = {}
        if "diffusers" in schemes:
            maps["diffusers"] = probe_row_map(ours, lambda sd: to_d(sd, cfg), lambda sd: from_d(sd, cfg))
        if "original" in schemes:
            maps["original"] = probe_row_map(ours, lambda sd: to_o(sd, cfg), lambda sd: from_o(sd, cfg))
        return maps
    raise UserError(f"LoRA is supported for U-Net and MMDiT networks, not {type(net).__name__}")


# ---------------------------------------------------------------------------- reading a file


@dataclass
class _Layer:
    name: str  # as in the file, without the part suffix
    component: str  # "net", "text_encoder", "text_encoder_2", ...
    scheme: str  # "diffusers", "original", "kohya" (net) or "hf" (text encoders)
    module: str  # the module path (dotted, or underscored for kohya)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` JSON -> {prefix: {lora_alpha, r, alpha_pattern}}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError("LoRA file has corrupt lora_adapter_metadata (not JSON)") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        prefix, _, name = key.partition(".")
        out.setdefault(prefix, {})[name] = value
    return out


def _alpha_from_config(config: dict, module: str) -> float | None:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config["lora_alpha"]) if "lora_alpha" in config else None


def read_lora(path: str | Path) -> tuple[list[_Layer], list[str]]:
    """The layers of a LoRA file, and the keys that fit no known layout."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"LoRA file {path} is not a readable safetensors file ({e})") from None
    return parse_lora(tensors, metadata)


def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
    """(layers, unknown keys) of a LoRA state dict."""
    configs = _peft_alphas(metadata or {})
    layers: dict[str, _Layer] = {}
    unknown = []
    for key, value in tensors.items():
        if m := _KOHYA.fullmatch(key):
            prefix, module, part = m[1], m[2], m[3]
            scheme = "kohya" if prefix == "lora_unet" else "kohya_hf"
        elif m := _PEFT.fullmatch(key):
            prefix, module, part = m[1], m[2], m[3]
            scheme = {"unet": "diffusers", "transformer": "diffusers", "diffusion_model": "original"}.get(prefix, "hf")
        else:
            unknown.append(key)
            continue
        name = key[: -len(part) - 1]
        layer = layers.setdefault(name, _Layer(name, _COMPONENT[prefix], scheme, module))
        if _PART[part] == "alpha":
            layer.alpha = float(value.float().item())
        else:
            layer.parts[_PART[part]] = value
        if layer.alpha is None and prefix in configs:
            layer.alpha = _alpha_from_config(configs[prefix], module)
    for layer in layers.values():
        if layer.parts.keys() != {"down", "up"}:
            unknown += [f"{layer.name} (no lora_{'up' if 'down' in layer.parts else 'down'} weight)"]
    return [la for la in layers.values() if la.parts.keys() == {"down", "up"}], sorted(unknown)


# ---------------------------------------------------------------------------- applying


@dataclass
class Target:
    """Rows of one parameter a LoRA layer writes to (all rows when `rows` is None)."""

    param: nn.Parameter
    name: str
    rows: torch.Tensor | None
    src_rows: torch.Tensor | None


@dataclass
class LoRA:
    """A LoRA file resolved against the modules it modifies. merge() adds its deltas, unmerge() takes them away."""

    source: str
    layers: list[tuple[_Layer, list[Target]]]
    merged_scale: float = 0.0

    @staticmethod
    def _delta(layer: _Layer, device) -> torch.Tensor:
        """scale x up @ down in float32 -> [out, in * kernel]."""
        down, up = layer.parts["down"].to(device, torch.float32), layer.parts["up"].to(device, torch.float32)
        rank = down.shape[0]
        scale = (layer.alpha if layer.alpha is not None else rank) / rank
        return scale * (up.flatten(1) @ down.flatten(1))

    def _add(self, factor: float) -> None:
        with torch.no_grad():
            for layer, targets in self.layers:
                delta = self._delta(layer, targets[0].param.device)
                for t in targets:
                    d = delta if t.src_rows is None else delta[t.src_rows.to(delta.device)]
                    d = (factor * d).view(d.shape[0], *t.param.shape[1:])
                    if t.rows is None:
                        t.param.add_(d.to(t.param.dtype))
                    else:
                        t.param.index_add_(0, t.rows.to(t.param.device), d.to(t.param.dtype))

    def merge(self, scale: float = 1.0) -> LoRA:
        """Add scale x the LoRA to the weights (once; unmerge first to change the scale)."""
        if self.merged_scale:
            raise UserError(f"LoRA {self.source} is already merged (scale {self.merged_scale}); unmerge it first")
        self._add(scale)
        self.merged_scale = scale
        return self

    def unmerge(self) -> LoRA:
        """Subtract what merge() added: the weights come back to within float rounding."""
        if self.merged_scale:
            self._add(-self.merged_scale)
            self.merged_scale = 0.0
        return self

    def report(self) -> dict:
        """Coverage: LoRA layers matched, and which parameters of which component they modify."""
        modified: dict[str, set[str]] = {}
        for layer, targets in self.layers:
            for t in targets:
                modified.setdefault(layer.component, set()).add(t.name)
        return {
            "file": self.source,
            "layers": len(self.layers),
            "keys": sum(len(layer.parts) + (layer.alpha is not None) for layer, _ in self.layers),
            "modified": {c: sorted(v) for c, v in sorted(modified.items())},
        }

    def summary(self) -> str:
        r = self.report()
        parts = ", ".join(f"{len(v)} weights of the {c.replace('net', 'network')}" for c, v in r["modified"].items())
        return f"LoRA {Path(r['file']).name}: {r['layers']} layers matched, modifying {parts}"


def _kohya_index(maps: dict[str, RowMap]) -> dict[str, tuple[str, str]]:
    """kohya's underscored module names -> (scheme, weight name); original names win over diffusers' (FLUX, SD3)."""
    index: dict[str, tuple[str, str]] = {}
    for scheme in ("diffusers", "hf", "original"):
        for weight in maps.get(scheme, {}):
            if weight.endswith(".weight"):
                index[weight[: -len(".weight")].replace(".", "_")] = (scheme, weight)
    return index


def _fits(layer: _Layer, rows: list[Rows], params: dict[str, nn.Parameter]) -> str:
    """Why the layer's shapes do not fit its targets ("" when they do)."""
    down, up = layer.parts["down"], layer.parts["up"]
    if down.shape[0] != up.shape[1]:
        return f"ranks differ (down {tuple(down.shape)}, up {tuple(up.shape)})"
    for key, _, src_rows in rows:
        p = params[key]
        n_out = p.shape[0] if src_rows is None else int(src_rows.max()) + 1
        if down[0].numel() != p[0].numel() or (src_rows is None and up.shape[0] != n_out) or up.shape[0] < n_out:
            return f"shape {tuple(up.shape[:1])} x {tuple(down.shape[1:])} does not fit {key} {tuple(p.shape)}"
    return ""


def resolve_lora(layers: list[_Layer], components: Mapping[str, nn.Module], source: str = "LoRA",
                 unknown: list[str] | None = None) -> LoRA:  # fmt: skip
    """Attach each layer to the parameters it modifies. `components`: "net" (an inkwash U-Net or MMDiT) and
    "text_encoder", "text_encoder_2", ... (transformers modules, addressed by their own names). Unknown keys and
    layers that land nowhere, or do not fit, raise one UserError listing them."""
    # kohya names FLUX / SD3 modules as the original files do, and SD U-Net modules as diffusers does
    wanted = tuple({"kohya": "original", "original": "original"}.get(la.scheme, "diffusers")
                   for la in layers if la.component == "net")  # fmt: skip
    maps = {c: net_row_maps(m, wanted) if c == "net" else {"hf": identity_row_map(m)} for c, m in components.items()}
    kohya = {c: _kohya_index(m) for c, m in maps.items()}
    params = {c: dict(m.named_parameters()) for c, m in components.items()}
    resolved, unmatched = [], list(unknown or [])
    for layer in layers:
        if layer.component not in maps:
            unmatched.append(f"{layer.name} (no {layer.component} to apply it to)")
            continue
        comp_maps = maps[layer.component]
        if layer.scheme.startswith("kohya"):
            scheme, weight = kohya[layer.component].get(layer.module, ("", ""))
            rows = comp_maps[scheme].get(weight) if scheme else None
        else:
            rows = comp_maps.get(layer.scheme, {}).get(layer.module + ".weight")
        why = _fits(layer, rows, params[layer.component]) if rows is not None else ""
        if rows is None or why:
            unmatched.append(layer.name + (f" ({why})" if why else ""))
            continue
        resolved.append((layer, [Target(params[layer.component][k], k, r, s) for k, r, s in rows]))
    if unmatched:
        raise UserError(f"{source}: {len(unmatched)} LoRA keys match nothing in this model: {sorted(unmatched)[:20]}")
    return LoRA(source, resolved)


def load_lora(path: str | Path, components: Mapping[str, nn.Module]) -> LoRA:
    """Read a kohya or diffusers / PEFT LoRA file and resolve it against the model's components (not merged)."""
    layers, unknown = read_lora(path)
    if not layers and not unknown:
        raise UserError(f"LoRA file {path} holds no LoRA weights")
    return resolve_lora(layers, components, str(path), unknown)

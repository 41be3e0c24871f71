"""ONNX export of a model's text encoder, denoising network and VAE decoder, and onnxruntime stand-ins for them.

`export_onnx(pipe, folder)` writes `denoiser.onnx`, `text_encoder.onnx` (MiniLM or the small trainable encoder;
the tokenizer travels beside it), `vae_decoder.onnx` for a latent model, and the manifest `inkwash-onnx.json`
(the model file's inkwash metadata: configs, process, prediction, sampling defaults; and each graph's input and
output names). `onnx_parts(folder)` turns such a folder back into the fields of a `Pipeline` whose network, text
encoder and autoencoder are onnxruntime sessions behind the torch call signatures (`net(x, t, **cond)`,
`encoder(prompts)`, `vae.decode_latent(z)`), so the pipeline's own samplers, guidance, seeds and PNG metadata
drive them unchanged.

Graphs come from torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, the default since torch 2.9;
the TorchScript one is deprecated), in float32, with a dynamic batch axis and a dynamic text-token axis; image
sides are fixed at export (`size`). Knows nothing of file layouts beyond the manifest; onnx, onnxscript and
onnxruntime are imported lazily (the `onnx` extra).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inkwash.diffusion import process_from_dict
from inkwash.errors import UserError
from inkwash.models.registry import config_from_dict
from inkwash.text import TextEncoderConfig, build_text_encoder
from inkwash.text.base import TextEmbedding, TextEncoder
from inkwash.text.minilm import MINILM_DIM

MANIFEST = "inkwash-onnx.json"  # pipeline.ONNX_MANIFEST: how `load` knows an export folder
FORMAT, VERSION = "inkwash-onnx", 1
OPSET = 18
EXPORT_BATCH = 2  # a batch of one would let the exporter specialise the batch axis to 1
TEXT_EXPORTS = ("minilm", "small", "none")  # text encoders with an export (or, 'none', without a network)
COND_NAMES = ("context", "context_mask", "y", "micro", "guidance")  # the keyword inputs Pipeline passes, in order


# ---------------------------------------------------------------------------- export


def denoiser_inputs(model_cfg, side: int, tokens: int = 7, batch: int = EXPORT_BATCH) -> dict[str, torch.Tensor]:
    """Example network inputs for every condition the config takes, as `Pipeline.conditions` passes them: x, t and
    then context + context_mask (text tokens), y (pooled text or class labels), micro (SDXL / PixArt sizes),
    guidance (FLUX dev)."""
    g = torch.Generator().manual_seed(0)
    kw = {"x": torch.randn(batch, model_cfg.in_channels, side, side, generator=g), "t": torch.rand(batch, generator=g)}
    if getattr(model_cfg, "context_dim", 0):
        kw["context"] = torch.randn(batch, tokens, model_cfg.context_dim, generator=g)
        kw["context_mask"] = torch.arange(tokens).expand(batch, tokens) < tokens - torch.arange(batch)[:, None]
    if getattr(model_cfg, "num_classes", 0):
        kw["y"] = torch.arange(batch) % model_cfg.num_classes
    elif getattr(model_cfg, "y_dim", 0):
        kw["y"] = torch.randn(batch, model_cfg.y_dim, generator=g)
    micro = getattr(model_cfg, "micro_conditions", 0) or (3 if getattr(model_cfg, "size_conditioning", False) else 0)
    if micro:
        kw["micro"] = torch.rand(batch, micro, generator=g) * side
    if getattr(model_cfg, "guidance_embed", False):
        kw["guidance"] = torch.full((batch,), 3.5)
    return kw


class _Positional(nn.Module):
    """A network called with its conditions by keyword, as a module of positional inputs (exporters want those)."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.net, self.names = net, names

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, **dict(zip(self.names, cond)))


class _TextIds(nn.Module):
    """A text encoder from token ids (the tokenizer runs in Python): ids, mask -> tokens [B, L, D], pooled [B, P]."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.encoder.encode_ids(input_ids, attention_mask)
        return emb.tokens, emb.pooled


class _Decode(nn.Module):
    """The autoencoder's diffusion latents -> images in [-1, 1] (its scale and shift included)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_latent(latent)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> dict:  # fmt: skip
    """One graph through the dynamo exporter; returns its manifest entry (file, input and output names, axes)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter translates through it)
    except ImportError:
        raise UserError("ONNX export needs the packages onnx and onnxscript: pip install 'inkwash[onnx]'") from None
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = [{i: dims.setdefault(n, Dim(n)) for i, n in axes.get(name, {}).items()} or None for name in inputs]
    if isinstance(module, _Positional):  # the conditions arrive as one *cond tuple
        shapes = [shapes[0], shapes[1], tuple(shapes[2:])]
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # "torchvision is not installed" notes for ops no inkwash model has
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporter's progress lines and axis-renaming notes
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, dynamic_shapes=tuple(shapes), input_names=inputs,
                output_names=outputs, opset_version=OPSET, optimize=True, verbose=False,
            )  # fmt: skip
    finally:
        log.setLevel(level)
    program.save(str(path))
    return {"file": path.name, "inputs": inputs, "outputs": outputs, "dynamic_axes": axes}


def export_denoiser(net: nn.Module, model_cfg, side: int, path: Path) -> dict:
    """The denoising network: inputs x [B, C, S, S], t [B] (the process's network time) and the conditions the
    config takes; output [B, out, S, S]. Batch and text tokens are dynamic."""
    kw = denoiser_inputs(model_cfg, side)
    names = tuple(k for k in COND_NAMES if k in kw)
    axes = {k: {0: "batch"} for k in kw}
    for k in ("context", "context_mask"):
        if k in kw:
            axes[k][1] = "tokens"
    with torch.no_grad():
        return _export(_Positional(net, names), tuple(kw.values()), path, list(kw), ["out"], axes)


def export_text_encoder(encoder: TextEncoder, path: Path) -> dict:
    """MiniLM (its tokenizer saved beside the graph) or the small trainable encoder: ids -> tokens, pooled."""
    ids, mask = encoder.tokenize(["a red circle above a blue square", "a star"])  # two lengths: padding is seen
    if type(encoder).__name__ == "MiniLMEncoder":
        encoder.tokenizer.save_pretrained(str(path.parent / "tokenizer"))
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    with torch.no_grad():
        return _export(_TextIds(encoder), (ids, mask), path, ["input_ids", "attention_mask"], ["tokens", "pooled"],
                       axes)  # fmt: skip


def export_vae_decoder(vae: nn.Module, side: int, path: Path) -> dict:
    """Diffusion latents [B, C, s, s] -> images [B, 3, s*f, s*f] in [-1, 1] (not clamped)."""
    z = torch.randn(EXPORT_BATCH, vae.cfg.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return _export(_Decode(vae), (z,), path, ["latent"], ["image"], {"latent": {0: "batch"}})


def export_onnx(pipe, folder: str | os.PathLike, size: int | None = None) -> Path:
    """Export a loaded `Pipeline` (an inkwash model file) to `folder`; returns the manifest's path. `size`: the
    image side in pixels the graphs take (default: the model's)."""
    if not all(k in pipe.meta for k in ("model", "process", "prediction", "text_encoder")):
        raise UserError("ONNX export takes an inkwash model file (not a preset, a single file or a diffusers folder)")
    if getattr(pipe.net, "onnx_session", None) is not None:
        raise UserError("this model is already an ONNX export")
    size = pipe.check_size(pipe.image_size if size is None else size)
    text = TextEncoderConfig.from_dict(pipe.meta["text_encoder"]).name
    if text not in TEXT_EXPORTS:
        raise UserError(f"the {text!r} text encoder has no ONNX export; only {', '.join(TEXT_EXPORTS)} do")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    side = size // pipe.latent_factor
    pipe = pipe.to("cpu")
    graphs = {"denoiser": export_denoiser(pipe.net.float(), pipe.model_cfg, side, folder / "denoiser.onnx")}
    if text != "none":  # 'none' has no network: the loader builds it from its config
        graphs["text_encoder"] = export_text_encoder(pipe.encoder, folder / "text_encoder.onnx")
    if pipe.vae is not None:
        graphs["vae_decoder"] = export_vae_decoder(pipe.vae, side, folder / "vae_decoder.onnx")
    manifest = {
        "format": FORMAT, "version": VERSION, "name": pipe.name, "size": size, "opset": OPSET,
        "torch": torch.__version__, "graphs": graphs, "meta": pipe.meta,
    }  # fmt: skip
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------- onnxruntime stand-ins


def session(path: Path, threads: int | None = None, providers: list[str] | None = None):
    """An onnxruntime session with `threads` intra-op threads (default: torch's, so OMP_NUM_THREADS=1 holds)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("running an ONNX export needs onnxruntime: pip install 'inkwash[onnx]'") from None
    if not path.is_file():
        raise UserError(f"the ONNX graph {path} is missing; export the model again")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


class _Session:
    """What every stand-in shares: a session, its declared input names, and the torch-module calls the pipeline
    makes on a network (`parameters()` for the input dtype, `to`, `eval`)."""

    def __init__(self, path: Path, entry: dict, threads: int | None = None):
        self.onnx_session = session(path, threads)
        self.inputs = list(entry["inputs"])

    def run(self, *arrays: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: a.detach().cpu().numpy() for n, a in zip(self.inputs, arrays)}
        return [torch.from_numpy(np.asarray(o)) for o in self.onnx_session.run(None, feed)]

    def parameters(self) -> Iterator[torch.Tensor]:
        """The graphs take float32; the Denoiser reads its input dtype from the first parameter."""
        yield torch.zeros(0)

    def to(self, device: str | torch.device = "cpu", *args, **kwargs):
        if torch.device(device).type != "cpu":
            raise UserError("an ONNX export runs through onnxruntime on the CPU; leave the device at cpu")
        return self

    def eval(self):
        return self


class OnnxNetwork(_Session):
    """The denoising network as `net(x, t, **cond) -> out`, backed by onnxruntime (float32, CPU tensors)."""

    def __init__(self, path: Path, entry: dict, threads: int | None = None):
        super().__init__(path, entry, threads)
        self.sample_shape = tuple(self.onnx_session.get_inputs()[0].shape[1:])  # [C, S, S], fixed at export

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise UserError(f"this ONNX export takes inputs of shape {list(self.sample_shape)}, not "
                            f"{list(x.shape[1:])}: export again with --size for another image size")  # fmt: skip
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        given = {k for k, v in cond.items() if v is not None}
        wanted = set(self.inputs[2:])
        if given != wanted:
            raise ValueError(f"this exported network takes {sorted(wanted)}, got {sorted(given)}")
        args = [x.float(), t.float()] + [cond[k] if cond[k].dtype in (torch.bool, torch.long) else cond[k].float()
                                        for k in self.inputs[2:]]  # fmt: skip
        return self.run(*args)[0]


class OnnxVAEDecoder(_Session):
    """The autoencoder as the pipeline uses it: `decode_latent(latents) -> images`, and its config."""

    def __init__(self, path: Path, entry: dict, cfg, threads: int | None = None):
        super().__init__(path, entry, threads)
        self.cfg = cfg

    def decode_latent(self, latent: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        if tile:
            raise UserError("tiled decoding is not available for an ONNX export")
        return self.run(latent.float())[0]


class OnnxTextEncoder(TextEncoder):
    """A text encoder whose network runs in onnxruntime: prompts are tokenized in Python as the torch encoder does
    (MiniLM's tokenizer from the export folder, or the small encoder's word/byte tokenizer), then ids -> session."""

    trainable = False

    def __init__(self, folder: Path, entry: dict, cfg: TextEncoderConfig, threads: int | None = None):
        super().__init__()
        self.graph = _Session(folder / entry["file"], entry, threads)
        self.cfg = cfg
        self.max_length, self.truncate = cfg.max_length, cfg.truncate
        if cfg.name == "minilm":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        else:
            from inkwash.text.small import WordByteTokenizer

            self.tokenizer = WordByteTokenizer(cfg.max_length)
        self.dim = self.pooled_dim = cfg.dim if cfg.name == "small" else MINILM_DIM

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch encoder's own tokenization: ids and mask [B, L]."""
        if self.cfg.name == "small":
            return self.tokenizer(list(prompts), truncate=self.truncate)
        from inkwash.text.minilm import tokenize

        return tokenize(self.tokenizer, prompts, self.max_length, self.truncate)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        ids, mask = self.tokenize(prompts)
        tokens, pooled = self.graph.run(ids, mask)
        return TextEmbedding(tokens, mask.bool(), pooled)


# ---------------------------------------------------------------------------- loading


def read_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not an ONNX export (no {MANIFEST}); make one with inkwash export-onnx")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{path} is not an {FORMAT} version {VERSION} manifest")
    return manifest


def onnx_parts(folder: str | os.PathLike, threads: int | None = None) -> dict[str, Any]:
    """The keyword arguments of a `Pipeline` whose network, text encoder and autoencoder run in onnxruntime (all but
    its sampling defaults, which are `meta["sampling"]`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    meta, graphs = manifest["meta"], manifest["graphs"]
    text_cfg = TextEncoderConfig.from_dict(meta["text_encoder"])
    if "text_encoder" in graphs:
        encoder = OnnxTextEncoder(folder, graphs["text_encoder"], text_cfg, threads)
    else:
        encoder = build_text_encoder(text_cfg)  # 'none': no network
    vae = None
    if "vae_decoder" in graphs:
        vae_cfg = config_from_dict(meta["vae"])
        vae = OnnxVAEDecoder(folder / graphs["vae_decoder"]["file"], graphs["vae_decoder"], vae_cfg, threads)
    entry = graphs["denoiser"]
    return {
        "net": OnnxNetwork(folder / entry["file"], entry, threads),
        "model_cfg": config_from_dict(meta["model"]),
        "process": process_from_dict(meta["process"]),
        "prediction": meta["prediction"],
        "encoder": encoder,
        "image_size": int(manifest["size"]),
        "channels": int(meta.get("channels", 3)),
        "name": manifest["name"],
        "meta": meta,
        "source": str(folder),
        "vae": vae,
    }

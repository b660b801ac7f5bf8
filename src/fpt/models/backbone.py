"""Backbone specs: where the frozen large pre-trained model (LPM) comes from, and loading it as a timm ViT.

Every backbone ends up as a timm ``VisionTransformer`` built with ``dynamic_img_size=True``, so its
position embeddings are resampled (bicubic) to whatever input grid it is given, while its parameters
stay those of the checkpoint.
"""

from __future__ import annotations

import difflib
import json
import pickle
import re
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from fpt.config import DEMO_BACKBONE, BackboneSpec, is_local_path
from fpt.errors import BackboneError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_HF_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load_backbone(spec: BackboneSpec, pretrained: bool = True) -> VisionTransformer:
    """Build the LPM described by ``spec``, frozen and in eval mode.

    With ``pretrained=False`` the architecture is built with random weights and nothing is read or
    downloaded except a local directory's ``config.json`` (enough for counting parameters).
    """
    if spec.name == DEMO_BACKBONE:
        if spec.weights is not None:
            raise BackboneError(f"backbone {DEMO_BACKBONE} comes with its own weights; drop the weights file")
        model = _load_local_directory(demo_lpm_directory(), spec, pretrained)
    elif is_local_path(spec.name):
        model = _load_local_directory(Path(spec.name).expanduser(), spec, pretrained)
    elif _HF_REPO_ID.match(spec.name) and not spec.name.startswith("hf-hub:"):
        model = _load_hf_repo(spec.name, spec, pretrained)
    else:
        model = _create_timm(spec.name, spec, pretrained=pretrained and spec.weights is None)
        if pretrained and spec.weights is not None:
            _load_weights_file(model, Path(spec.weights).expanduser())
    check_supported(model, spec.name)
    return model.eval().requires_grad_(False)


def demo_lpm_directory() -> Path:
    """Where the installed package keeps the demo LPM (``fpt:demo``): a timm checkpoint directory."""
    return Path(str(resources.files("fpt") / "assets" / "demo_lpm"))


def backbone_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the backbone was pre-trained with (ImageNet's when unknown)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)
    std = pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def check_supported(model: nn.Module, name: str) -> None:
    """Raise unless ``model`` is a timm ViT whose blocks use a fused ``attn.qkv`` projection."""
    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"backbone '{name}' is a {type(model).__name__}, not a timm VisionTransformer; FPT supports the "
            "ViT family (vit_*, deit_*, vit_*_dinov2, models with register tokens)"
        )
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(attn, "num_heads"):
            raise BackboneError(
                f"backbone '{name}': block {index} has no timm Attention with a fused qkv projection, "
                "which FPT reads the keys and values from; use a standard ViT block layout"
            )


def _create_timm(name: str, spec: BackboneSpec, pretrained: bool, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **spec.model_kwargs, **kwargs)
    except RuntimeError as error:
        if "Unknown model" not in str(error):
            raise
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise BackboneError(f"unknown timm model '{name}'.{hint}") from None
    except TypeError as error:
        raise BackboneError(f"cannot build backbone '{name}' as a ViT: {error}") from None
    except OSError as error:
        raise BackboneError(
            f"could not download the pre-trained weights of '{name}' ({error.__class__.__name__}). "
            "Without internet access, download them on another machine and pass the file with "
            "--backbone-weights FILE.safetensors (the architecture stays --backbone), or pass a local "
            "checkpoint directory as --backbone DIR"
        ) from None


def _load_weights_file(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"weights file {path} has suffix '{path.suffix}'; expected one of {WEIGHT_SUFFIXES}")
    load_vit_state_dict(model, checkpoint_filter_fn(_read_state_dict(path), model), str(path))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict(str(path), weights_only=True)
    except Exception as error:  # unreadable, truncated, or pickled objects that weights_only refuses
        if isinstance(error, pickle.UnpicklingError) or isinstance(error.__cause__, pickle.UnpicklingError):
            raise BackboneError(
                f"weights file {path} holds pickled Python objects besides tensors, which fpt never unpickles (they "
                "could run code); save its state dict as .safetensors (safetensors.torch.save_file) and pass that"
            ) from None
        raise BackboneError(f"cannot read weights file {path}: {error}") from None


def load_vit_state_dict(model: VisionTransformer, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a timm-layout state dict, adapting the classifier head to the checkpoint's (or removing it)."""
    head = state_dict.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    model_state = model.state_dict()
    mismatched = [
        f"{key} {tuple(value.shape)} (the architecture's {tuple(model_state[key].shape)})"
        for key, value in state_dict.items()
        if key in model_state and value.shape != model_state[key].shape
    ]
    if mismatched:
        raise BackboneError(
            f"weights in {source} have other shapes than the architecture: {_few(mismatched)}; check that --backbone "
            "names the architecture they were trained with"
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"weights in {source} do not match the architecture: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}; check that --backbone names the architecture they were trained with"
        )


def _few(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def _load_local_directory(path: Path, spec: BackboneSpec, pretrained: bool) -> nn.Module:
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise BackboneError(
            f"backbone directory {path} must hold a config.json and weights; to use a single weights file "
            "pass --backbone ARCHITECTURE --backbone-weights FILE"
        )
    config = json.loads(config_file.read_text())
    if "architecture" in config:
        return _create_timm(f"local-dir:{path}", spec, pretrained=pretrained)
    if config.get("model_type") == "vit":
        return vit_from_hf_directory(path, config, pretrained)
    raise BackboneError(
        f"{config_file} is neither a timm config (key 'architecture') nor a Hugging Face ViT config (model_type 'vit')"
    )


def _load_hf_repo(repo_id: str, spec: BackboneSpec, pretrained: bool) -> nn.Module:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    patterns = ["config.json", "preprocessor_config.json"]
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if pretrained:  # safetensors when the repo has them, the pickle-free way; else the .bin
            weights = "model.safetensors" if _repo_has(repo_id, "model.safetensors") else "pytorch_model.bin"
            directory = Path(snapshot_download(repo_id, allow_patterns=[*patterns, weights]))
    except (OSError, HfHubHTTPError) as error:
        raise BackboneError(
            f"could not download '{repo_id}' from the Hugging Face Hub ({error.__class__.__name__}). "
            "Without internet access, copy the checkpoint directory (config.json + model.safetensors) to "
            "this machine and pass it as --backbone DIR"
        ) from None
    return _load_local_directory(directory, spec, pretrained)


def _repo_has(repo_id: str, filename: str) -> bool:
    from huggingface_hub import file_exists

    return file_exists(repo_id, filename)


# Hugging Face ViT (ViTModel / ViTForImageClassification) -> timm VisionTransformer.
# Both the Hub's long-standing names and transformers 5's module names are accepted.
_HF_LAYER_KEY = re.compile(
    r"^(?:encoder\.layer|layers)\.(\d+)\.(attention\.attention\.query|attention\.attention\.key|"
    r"attention\.attention\.value|attention\.q_proj|attention\.k_proj|attention\.v_proj|"
    r"attention\.output\.dense|attention\.o_proj|intermediate\.dense|output\.dense|mlp\.fc1|mlp\.fc2|"
    r"layernorm_before|layernorm_after)\.(weight|bias)$"
)
_HF_LAYER_TARGET = {
    "attention.attention.query": "q",
    "attention.q_proj": "q",
    "attention.attention.key": "k",
    "attention.k_proj": "k",
    "attention.attention.value": "v",
    "attention.v_proj": "v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_OTHER_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_IGNORED_KEYS = re.compile(r"^(pooler\.|embeddings\.mask_token)")
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def hf_vit_state_dict_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ViT state dict to timm's layout; separate q/k/v are stacked into ``qkv``.

    The pooler (a tanh projection timm's ViT does not have) and the mask token are dropped.
    """
    converted: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("vit.")
        if _HF_IGNORED_KEYS.match(key):
            continue
        layer_match = _HF_LAYER_KEY.match(key)
        if layer_match:
            layer, module, kind = layer_match.groups()
            target = _HF_LAYER_TARGET[module]
            if target in ("q", "k", "v"):
                qkv_parts.setdefault((int(layer), kind), {})[target] = tensor
            else:
                converted[f"blocks.{layer}.{target}.{kind}"] = tensor
        elif key in _HF_OTHER_KEYS:
            converted[_HF_OTHER_KEYS[key]] = tensor
        else:
            raise BackboneError(f"unexpected key '{key}' in a Hugging Face ViT checkpoint")
    for (layer, kind), parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise BackboneError(f"layer {layer} of the Hugging Face checkpoint lacks some of query/key/value")
        converted[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def vit_from_hf_config(config: dict[str, Any]) -> VisionTransformer:
    """A randomly initialised timm ViT with the geometry of a Hugging Face ``ViTConfig`` dict."""
    activation = config.get("hidden_act", "gelu")
    if activation not in _HF_ACTIVATIONS:
        raise BackboneError(f"Hugging Face ViT activation '{activation}' is not supported")
    hidden = config["hidden_size"]
    is_classifier = "ViTForImageClassification" in config.get("architectures", [])
    return VisionTransformer(
        img_size=config["image_size"],
        patch_size=config["patch_size"],
        in_chans=config.get("num_channels", 3),
        num_classes=len(config.get("id2label", {})) if is_classifier else 0,
        embed_dim=hidden,
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_ratio=config["intermediate_size"] / hidden,
        qkv_bias=config.get("qkv_bias", True),
        norm_layer=partial(nn.LayerNorm, eps=config.get("layer_norm_eps", 1e-12)),
        act_layer=_HF_ACTIVATIONS[activation],
        dynamic_img_size=True,
    )


def vit_from_hf_directory(path: Path, config: dict[str, Any], pretrained: bool) -> VisionTransformer:
    """Build a timm ViT from a Hugging Face ViT checkpoint directory (``config.json`` + weights).

    Its normalisation comes from ``preprocessor_config.json`` when present, else the ViT processor's
    default of 0.5 mean and std.
    """
    model = vit_from_hf_config(config)
    processor_file = path / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    model.pretrained_cfg = {
        "mean": processor.get("image_mean", [0.5] * 3),
        "std": processor.get("image_std", [0.5] * 3),
    }
    if not pretrained:
        return model
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise BackboneError(f"{path} has a config.json but neither model.safetensors nor pytorch_model.bin")
    load_vit_state_dict(model, hf_vit_state_dict_to_timm(_read_state_dict(weights)), str(weights))
    return model

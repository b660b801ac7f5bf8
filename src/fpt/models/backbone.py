"""Backbone specs: where the frozen large pre-trained model (LPM) comes from, and loading it as a timm model.

Every backbone ends up as a timm ``VisionTransformer`` or ``Eva`` (``fpt.models.lpm_attention``) built with
``dynamic_img_size=True``, so its position embeddings (or rotary embeddings) follow whatever input grid it is given,
while its parameters stay those of the checkpoint. Hugging Face ViT, DINOv2 and SigLIP directories are converted
to timm's ``VisionTransformer`` layout.
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
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked
from timm.models import load_state_dict
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from fpt.config import DEMO_BACKBONE, BackboneSpec, is_local_path
from fpt.errors import BackboneError
from fpt.models.lpm_attention import LPM, check_supported

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_HF_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load_backbone(spec: BackboneSpec, pretrained: bool = True, input_size: int | None = None) -> LPM:
    """Build the LPM described by ``spec``, frozen and in eval mode.

    With ``pretrained=False`` the architecture is built with random weights and nothing is read or
    downloaded except a local directory's ``config.json`` (enough for counting parameters). ``input_size``: the
    side in pixels the LPM will read, where the spec resamples its position embeddings other than timm's way
    (they are then resampled once, to that grid).
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
            _load_weights_file(model, Path(spec.weights).expanduser(), spec.name)
    check_supported(model, spec.name)
    if spec.pos_embed_resampling != "timm" and input_size is not None:
        resample_position_embeddings(model, input_size, spec.pos_embed_resampling)
    return model.eval().requires_grad_(False)


def resample_position_embeddings(model: LPM, input_size: int, method: str) -> None:
    """Resample a ViT's patch position embeddings to the grid of ``input_size`` pixels in place, by ``method``
    ("hf" or "dino": ``BackboneSpec.pos_embed_resampling``); timm then uses them as they are at that size."""
    if not isinstance(model, VisionTransformer) or model.pos_embed is None:
        raise BackboneError(
            f"--pos-embed-resampling {method} applies to the position embeddings of timm VisionTransformer models; "
            f"this backbone is a {type(model).__name__}: leave it at timm"
        )
    patch = model.patch_embed.patch_size[0]
    old, new = model.patch_embed.grid_size, (input_size // patch, input_size // patch)
    if tuple(old) == new:  # every method leaves the embeddings as they are at their own size
        return
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    embeddings = model.pos_embed.detach()
    grid = embeddings[:, prefix:].float().reshape(1, *old, -1).permute(0, 3, 1, 2)
    if method == "hf":
        grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    else:  # DINO's: the scale factor of a grid 0.1 larger, which avoids a floating-point rounding of the size
        scale = ((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(grid.shape[-2:]) != new:
            raise BackboneError(f"DINO-style resampling of a {old} grid gave {tuple(grid.shape[-2:])}, not {new}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(embeddings.dtype)
    model.pos_embed = nn.Parameter(torch.cat([embeddings[:, :prefix], grid], dim=1), requires_grad=False)
    model.patch_embed.img_size = (input_size, input_size)
    model.patch_embed.grid_size = new
    model.patch_embed.num_patches = new[0] * new[1]


def demo_lpm_directory() -> Path:
    """Where the installed package keeps the demo LPM (``fpt:demo``): a timm checkpoint directory."""
    return Path(str(resources.files("fpt") / "assets" / "demo_lpm"))


def backbone_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std the backbone was pre-trained with (ImageNet's when unknown)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)
    std = pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# model kwargs that name a timm layer class, as strings in JSON (``{"mlp_layer": "SwiGLUPacked"}``)
_LAYER_CLASSES = {"Mlp": Mlp, "GluMlp": GluMlp, "SwiGLU": SwiGLU, "SwiGLUPacked": SwiGLUPacked}


def timm_model_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``BackboneSpec.model_kwargs`` as timm takes them: ``mlp_layer`` names become timm's classes."""
    resolved = dict(model_kwargs)
    layer = resolved.get("mlp_layer")
    if isinstance(layer, str):
        if layer not in _LAYER_CLASSES:
            raise BackboneError(
                f"unknown mlp_layer '{layer}' in the backbone's model kwargs; use one of {', '.join(_LAYER_CLASSES)}"
            )
        resolved["mlp_layer"] = _LAYER_CLASSES[layer]
    return resolved


def _create_timm(name: str, spec: BackboneSpec, pretrained: bool, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(
            name, pretrained=pretrained, dynamic_img_size=True, **timm_model_kwargs(spec.model_kwargs), **kwargs
        )
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


def _load_weights_file(model: LPM, path: Path, name: str) -> None:
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"weights file {path} has suffix '{path.suffix}'; expected one of {WEIGHT_SUFFIXES}")
    checkpoint_filter = eva_checkpoint_filter_fn if isinstance(model, Eva) else checkpoint_filter_fn
    state_dict = checkpoint_filter(_read_state_dict(path), model)
    # a masked autoencoder's pre-training checkpoint (RETFound-MAE) also holds its decoder, which fpt never runs
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith("decoder")}
    load_vit_state_dict(model, state_dict, str(path), name)


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


def load_vit_state_dict(model: LPM, state_dict: dict[str, torch.Tensor], source: str, name: str = "") -> None:
    """Load a timm-layout state dict, adapting the classifier head to the checkpoint's (or removing it); ``name``
    is the architecture as the user gave it, for the error messages."""
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
            f"weights in {source} ({_describe(state_dict)}) do not fit the architecture {name or 'built'} "
            f"({_describe(model_state)}): {_few(mismatched)}; pass the architecture they were trained with as "
            "--backbone (and its constructor arguments with --backbone-kwargs)"
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"weights in {source} do not match the architecture: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}; check that --backbone names the architecture they were trained with"
        )


def _describe(state_dict: dict[str, torch.Tensor]) -> str:
    """'width W, D blocks, patch P' of a timm-layout state dict, from its patch embedding and block indices."""
    patch = state_dict.get("patch_embed.proj.weight")
    blocks = {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")}
    parts = [f"width {patch.shape[0]}"] if patch is not None else []
    parts.append(f"{max(blocks) + 1 if blocks else 0} blocks")
    if patch is not None:
        parts.append(f"patch {patch.shape[-1]}")
    return ", ".join(parts)


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
    if config.get("model_type") in HF_MODEL_TYPES:
        if spec.model_kwargs:
            raise BackboneError(
                f"{path} is a Hugging Face checkpoint, built from its config.json; --backbone-kwargs applies to timm "
                "architectures: drop it (or edit config.json)"
            )
        return vit_from_hf_directory(path, config, pretrained)
    raise BackboneError(
        f"{config_file} is neither a timm config (key 'architecture') nor a Hugging Face config of a model fpt reads "
        f"(model_type {', '.join(HF_MODEL_TYPES)}); its model_type is '{config.get('model_type')}'"
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


# Hugging Face checkpoints -> timm VisionTransformer. Both the Hub's long-standing names and transformers 5's module
# names are accepted; separate query/key/value linears are stacked into timm's fused qkv.
_HF_LAYER_KEY = re.compile(
    r"^(?:encoder\.layers?|layers)\.(\d+)\.("
    r"attention\.attention\.(?:query|key|value)|attention\.[qkv]_proj|self_attn\.[qkv]_proj|"
    r"attention\.output\.dense|attention\.o_proj|self_attn\.out_proj|"
    r"intermediate\.dense|output\.dense|mlp\.fc1|mlp\.fc2|mlp\.weights_in|mlp\.weights_out|"
    r"layernorm_before|layernorm_after|norm1|norm2|layer_norm1|layer_norm2|layer_scale1|layer_scale2"
    r")\.(weight|bias|lambda1)$"
)
_HF_LAYER_TARGET = {
    "attention.attention.query": "q",
    "attention.q_proj": "q",
    "self_attn.q_proj": "q",
    "attention.attention.key": "k",
    "attention.k_proj": "k",
    "self_attn.k_proj": "k",
    "attention.attention.value": "v",
    "attention.v_proj": "v",
    "self_attn.v_proj": "v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "self_attn.out_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "mlp.weights_in": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_out": "mlp.fc2",
    "layernorm_before": "norm1",
    "norm1": "norm1",
    "layer_norm1": "norm1",
    "layernorm_after": "norm2",
    "norm2": "norm2",
    "layer_norm2": "norm2",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
}
_HF_OTHER_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.position_embedding.weight": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# the ViT pooler, the mask token, SigLIP's attention-pool head and text tower: nothing fpt reads
_HF_IGNORED_KEYS = re.compile(r"^(pooler\.|embeddings\.mask_token|head\.|text_model\.|logit_scale|logit_bias)")
_HF_PREFIXES = ("vit.", "dinov2.", "vision_model.")
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
HF_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "siglip_vision_model", "siglip")


def hf_state_dict_to_timm(state_dict: dict[str, torch.Tensor], model_type: str = "vit") -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ViT, DINOv2 or SigLIP state dict to timm's ``VisionTransformer`` layout.

    Separate q/k/v are stacked into ``qkv``; DINOv2's CLS position embedding is folded into its CLS token (timm's
    ``no_embed_class`` layout, as timm's own DINOv2 models are built); SigLIP's [P, d] position table gets a batch
    axis. The ViT pooler, mask token, SigLIP's attention-pool head and the classifiers of models other than ViT are
    dropped: fpt reads the tokens only.
    """
    converted: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        for prefix in _HF_PREFIXES:
            key = key.removeprefix(prefix)
        if _HF_IGNORED_KEYS.match(key) or (model_type != "vit" and key.startswith("classifier.")):
            continue
        layer_match = _HF_LAYER_KEY.match(key)
        if layer_match:
            layer, module, kind = layer_match.groups()
            target = _HF_LAYER_TARGET[module]
            if target in ("q", "k", "v"):
                qkv_parts.setdefault((int(layer), kind), {})[target] = tensor
            elif target in ("ls1", "ls2"):
                converted[f"blocks.{layer}.{target}.gamma"] = tensor
            else:
                converted[f"blocks.{layer}.{target}.{kind}"] = tensor
        elif key in _HF_OTHER_KEYS:
            converted[_HF_OTHER_KEYS[key]] = tensor
        else:
            raise BackboneError(f"unexpected key '{key}' in a Hugging Face {model_type} checkpoint")
    for (layer, kind), parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise BackboneError(f"layer {layer} of the Hugging Face checkpoint lacks some of query/key/value")
        converted[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if model_type.startswith("dinov2") and "pos_embed" in converted:
        converted["cls_token"] = converted["cls_token"] + converted["pos_embed"][:, :1]
        converted["pos_embed"] = converted["pos_embed"][:, 1:]
    if converted.get("pos_embed") is not None and converted["pos_embed"].dim() == 2:
        converted["pos_embed"] = converted["pos_embed"].unsqueeze(0)
    return converted


# each family's config defaults in transformers: configs written by older versions leave out what equals them
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16},
    "dinov2": {"hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 224, "patch_size": 14, "mlp_ratio": 4},
    "siglip_vision_model": {
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "image_size": 224,
        "patch_size": 16,
    },
}
_HF_COMMON_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}


def vit_from_hf_config(config: dict[str, Any]) -> VisionTransformer:
    """A randomly initialised timm ViT with the geometry of a Hugging Face ViT, DINOv2 (with or without registers)
    or SigLIP vision config dict (``model_type`` says which); fields it leaves out take transformers' defaults."""
    model_type = config.get("model_type", "vit")
    family = "dinov2" if model_type.startswith("dinov2") else model_type
    config = {**_HF_COMMON_DEFAULTS, **_HF_DEFAULTS.get(family, {}), **config}
    activation = config.get("hidden_act", "gelu")
    if activation not in _HF_ACTIVATIONS:
        raise BackboneError(f"Hugging Face {model_type} activation '{activation}' is not supported")
    hidden = config["hidden_size"]
    geometry: dict[str, Any] = {
        "img_size": config["image_size"],
        "patch_size": config["patch_size"],
        "in_chans": config.get("num_channels", 3),
        "embed_dim": hidden,
        "depth": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "qkv_bias": config.get("qkv_bias", True),
        "norm_layer": partial(nn.LayerNorm, eps=config.get("layer_norm_eps", 1e-12)),
        "act_layer": _HF_ACTIVATIONS[activation],
        "dynamic_img_size": True,
    }
    if model_type == "vit":
        is_classifier = "ViTForImageClassification" in (config.get("architectures") or [])
        geometry |= {
            "num_classes": len(config.get("id2label", {})) if is_classifier else 0,
            "mlp_ratio": config["intermediate_size"] / hidden,
        }
    elif model_type.startswith("dinov2"):
        geometry |= {
            "num_classes": 0,
            "mlp_ratio": config.get("mlp_ratio", 4),
            "init_values": config.get("layerscale_value", 1.0),
            "reg_tokens": config.get("num_register_tokens", 0),
            "no_embed_class": True,
        }
        if config.get("use_swiglu_ffn", False):  # packed SwiGLU: fc1 gives both halves, hidden width rounded to 8
            width = (int(hidden * geometry["mlp_ratio"] * 2 / 3) + 7) // 8 * 8
            geometry |= {"mlp_ratio": 2 * width / hidden, "mlp_layer": SwiGLUPacked, "act_layer": "silu"}
    elif model_type == "siglip_vision_model":
        geometry |= {
            "num_classes": 0,
            "mlp_ratio": config["intermediate_size"] / hidden,
            "class_token": False,
            "global_pool": "avg",
            "fc_norm": False,  # post_layernorm is the final norm of every token, as in SigLIP
        }
    else:
        raise BackboneError(f"Hugging Face model type '{model_type}' is not supported; fpt reads {HF_MODEL_TYPES}")
    return VisionTransformer(**geometry)


def vit_from_hf_directory(path: Path, config: dict[str, Any], pretrained: bool) -> VisionTransformer:
    """Build a timm ViT from a Hugging Face ViT, DINOv2 or SigLIP checkpoint directory (``config.json`` + weights;
    a full SigLIP model's vision tower is used).

    Its normalisation comes from ``preprocessor_config.json`` when present, else the family's processor default
    (ImageNet's for DINOv2, 0.5 mean and std for ViT and SigLIP).
    """
    if config.get("model_type") == "siglip":
        config = {"model_type": "siglip_vision_model", **config.get("vision_config", {})}
    model_type = config.get("model_type", "vit")
    if pretrained:  # every parameter is overwritten by the checkpoint: no random initialisation (seconds for a ViT-L)
        with torch.device("meta"):
            model = vit_from_hf_config(config).to_empty(device="cpu")
    else:
        model = vit_from_hf_config(config)
    processor_file = path / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if model_type.startswith("dinov2") else ([0.5] * 3,) * 2
    model.pretrained_cfg = {
        "mean": processor.get("image_mean", list(mean)),
        "std": processor.get("image_std", list(std)),
    }
    if not pretrained:
        return model
    files = _hf_weight_files(path)
    state_dict = {key: value for file in files for key, value in _read_state_dict(file).items()}
    load_vit_state_dict(model, hf_state_dict_to_timm(state_dict, model_type), str(files[0]))
    return model


def _hf_weight_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: one file, or the shards its index lists."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            missing = [name for name in shards if not (path / name).is_file()]
            if missing:
                raise BackboneError(f"{path / index} lists shards that are not there: {', '.join(missing)}")
            return [path / name for name in shards]
    raise BackboneError(f"{path} has a config.json but neither model.safetensors nor pytorch_model.bin (nor shards)")

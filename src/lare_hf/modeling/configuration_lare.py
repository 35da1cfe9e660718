"""LaRe model configuration."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN

from .refocus import WINDOW_SELECTIONS
from .validation import check_bool, check_choice, check_float, check_int, check_known_keys

LARE_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "latent_start_token": "<|latent_start|>",
    "latent_token": "<|latent|>",
    "latent_end_token": "<|latent_end|>",
}

CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Paper, Appendix B / Table 7: the denoising U-Net of the image reconstructor.
TABLE7_UNET_CONFIG: dict[str, Any] = {
    "layers_per_block": 3,
    "block_out_channels": [96, 192, 384, 512],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 64,
    "norm_num_groups": 32,
}

# KL-16 image tokenizer (Rombach et al., 2022): a continuous KL-VAE with 16 latent channels at 1/16 resolution,
# i.e. five resolution levels (four 2x downsamplings).
KL16_IMAGE_TOKENIZER_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "block_out_channels": [128, 128, 256, 256, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}


class LaReConfig(PreTrainedConfig):
    r"""
    Configuration of a LaRe model (LLaVA-shaped VLM + latent refocusing, Sec. 3.1, Appendix B).

    Args:
        vision_config: config of the vision tower (CLIP-ViT-L/14 at 224 px by default: a 16x16 grid).
        text_config: config of the decoder language model (Qwen2 by default).
        image_token_id / latent_start_token_id / latent_token_id / latent_end_token_id: ids of the special tokens
            `<|image|>`, `<|latent_start|>`, `<|latent|>` and `<|latent_end|>` in the tokenizer.
        image_seq_length: number of `<|image|>` placeholders per image: the patches of the square grid, plus the
            CLS token when `vision_feature_select_strategy="full"` keeps it (CLIP).
        projector_hidden_act: activation of the 2-layer projector (LLaVA's).
        vision_feature_layer: the vision tower's hidden state(s) V_T is read from (LLaVA's convention): an index, or
            a list of indices whose features are concatenated (the projector's input is then that many times wider).
        vision_feature_select_strategy: LLaVA's "default" (drop the first token, CLIP's CLS) or "full" (keep every
            token). With "full" and a CLS token, the CLS token is fed to the LM as LLaVA feeds it but is not a cell
            of the patch grid: it takes no part in the saliency map or the windows (Eq. 1-2); not in the paper,
            whose backbones use "default".
        num_latent_steps: K, the default number of refocusing iterations (Eq. 1-2).
        max_latent_steps: the largest K the model accepts.
        latent_tokens_per_step: m, latent tokens the Extractor writes per iteration.
        extractor_num_layers / extractor_num_heads: N and heads of the Extractor (Appendix B: 2 / 12).
        extractor_hidden_size: width of the Extractor (None = the LM hidden size, 1536 for Qwen2.5-1.5B).
        extractor_intermediate_size: FFN width of the Extractor (None = 4 x hidden).
        window_size / window_stride: sliding window over the patch grid for the saliency sum-pooling (Sec. 3.1).
        saliency_layers: LM layers whose attention (last position -> image tokens) is averaged into the
            saliency map (None = all layers).
        use_extractor: ablation switch (Table 3 "w/o Extractor"): when False, each step's latent tokens are the
            window features average-pooled into `m` tokens, with no learned module.
        use_sliding_window: ablation switch (Table 3 "w/o Sliding Windows"): when False, V_s is the whole grid.
        sym_loss_weight / image_loss_weight / text_loss_weight: lambda_sym, lambda_img, lambda_text (Eq. 10).
        window_loss_weight: weight of a window-grounding loss that is not in the paper (0 = off, the paper): the
            cross-entropy of step k's saliency map, normalised over the image tokens, at the image token reasoning
            step k needs (`window_targets` of `forward()`). The window is an argmax of the saliency, so nothing
            else gives its choice a gradient; a lever of the small-scale reproduction.
        window_selection: how the window V_s is chosen in training; not in the paper unless "argmax". "argmax"
            (default, the paper): the most salient window, whose choice gets no gradient. Label-free relaxations
            that let the answer's loss reach the saliency, i.e. the LM attention that picks the window (Eq. 1-2),
            with p = softmax(log s / tau) over the sum-pooled saliency s of the candidate windows:
            "straight_through" (argmax window forward, the gradient of E_p[V] backward), "gumbel" (straight-through
            Gumbel-softmax top-1: a window sampled by argmax(log s + g), the gradient of softmax((log s + g)/tau)
            backward) and "soft" (V_s = E_p[V] forward and backward); equations in
            `refocus.relaxed_window_features`. Training only: evaluation and `generate()` use the argmax window.
            Refuses gradient checkpointing (the saliency is recorded inside autograd, which a checkpointed layer's
            replay would not record).
        window_temperature: tau of the relaxed window selection (not in the paper), or its value at the start of
            training when `window_temperature_end` is set.
        window_temperature_end: when set, tau is annealed geometrically from `window_temperature` to this value
            over training (`training.WindowTemperatureCallback`, added by `LaReTrainer`; not in the paper); None keeps
            tau constant.
        alignment_temperature / learnable_temperature: tau of Eq. 6, fixed or learned.
        text_prefix_length: rationale tokens the latents must reconstruct (Eq. 8).
        use_reconstructor: build the U-Net image reconstructor and the image tokenizer (Eq. 7). Inference-only
            checkpoints can leave them out.
        reconstructor_config: kwargs of `diffusers.UNet2DConditionModel` (Table 7 by default).
        image_tokenizer_config: kwargs of `diffusers.AutoencoderKL` (KL-16 by default).
        reconstruction_image_size: side of the window crop fed to the image tokenizer.
        image_mean / image_std: the processor's pixel normalisation, used to turn `pixel_values` back into
            [-1, 1] images for the image tokenizer.
        num_diffusion_steps / diffusion_beta_start / diffusion_beta_end: linear DDPM schedule (Appendix B).
        components: the pretrained parts the model was assembled from (`from_components`), by role ("vision",
            "text", "image_tokenizer"): `{"source": Hub id or path, "license": its license or None}`. The model
            card takes `base_model` and the license from them.
    """

    model_type = "lare"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PreTrainedConfig | None = None,
        text_config: dict | PreTrainedConfig | None = None,
        image_token_id: int = 151665,
        latent_start_token_id: int = 151666,
        latent_token_id: int = 151667,
        latent_end_token_id: int = 151668,
        image_seq_length: int = 256,
        projector_hidden_act: str = "gelu",
        vision_feature_layer: int | list[int] = -2,
        vision_feature_select_strategy: str = "default",
        multimodal_projector_bias: bool = True,
        num_latent_steps: int = 4,
        max_latent_steps: int = 16,
        latent_tokens_per_step: int = 4,
        extractor_num_layers: int = 2,
        extractor_num_heads: int = 12,
        extractor_hidden_size: int | None = None,
        extractor_intermediate_size: int | None = None,
        window_size: int = 8,
        window_stride: int = 4,
        saliency_layers: list[int] | None = None,
        use_extractor: bool = True,
        use_sliding_window: bool = True,
        sym_loss_weight: float = 1.0,
        image_loss_weight: float = 0.9,
        text_loss_weight: float = 0.9,
        window_loss_weight: float = 0.0,
        window_selection: str = "argmax",
        window_temperature: float = 1.0,
        window_temperature_end: float | None = None,
        alignment_temperature: float = 0.07,
        learnable_temperature: bool = False,
        text_prefix_length: int = 32,
        use_reconstructor: bool = True,
        reconstructor_config: dict | None = None,
        image_tokenizer_config: dict | None = None,
        reconstruction_image_size: int = 256,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        num_diffusion_steps: int = 1000,
        diffusion_beta_start: float = 1e-4,
        diffusion_beta_end: float = 0.02,
        components: dict[str, dict[str, str | None]] | None = None,
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = dict(vision_config)
            vision_config.setdefault("model_type", "clip_vision_model")
            vision_config = AutoConfig.for_model(**vision_config)
        elif vision_config is None:
            vision_config = AutoConfig.for_model(
                "clip_vision_model",
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                patch_size=14,
                image_size=224,
                projection_dim=768,
            )
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config.setdefault("model_type", "qwen2")
            text_config = AutoConfig.for_model(**text_config)
        elif text_config is None:
            # Qwen2.5-1.5B-Instruct, the paper's main backbone.
            text_config = AutoConfig.for_model(
                "qwen2",
                vocab_size=151936,
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                max_position_embeddings=32768,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                tie_word_embeddings=True,
            )

        self.vision_config = vision_config
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.latent_start_token_id = latent_start_token_id
        self.latent_token_id = latent_token_id
        self.latent_end_token_id = latent_end_token_id
        self.image_seq_length = image_seq_length
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_layer = (
            list(vision_feature_layer) if isinstance(vision_feature_layer, (list, tuple)) else vision_feature_layer
        )
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.multimodal_projector_bias = multimodal_projector_bias
        self.num_latent_steps = num_latent_steps
        self.max_latent_steps = max_latent_steps
        self.latent_tokens_per_step = latent_tokens_per_step
        self.extractor_num_layers = extractor_num_layers
        self.extractor_num_heads = extractor_num_heads
        self.extractor_hidden_size = extractor_hidden_size
        self.extractor_intermediate_size = extractor_intermediate_size
        self.window_size = window_size
        self.window_stride = window_stride
        self.saliency_layers = list(saliency_layers) if saliency_layers is not None else None
        self.use_extractor = use_extractor
        self.use_sliding_window = use_sliding_window
        self.sym_loss_weight = sym_loss_weight
        self.image_loss_weight = image_loss_weight
        self.text_loss_weight = text_loss_weight
        self.window_loss_weight = window_loss_weight
        self.window_selection = window_selection
        self.window_temperature = window_temperature
        self.window_temperature_end = window_temperature_end
        self.alignment_temperature = alignment_temperature
        self.learnable_temperature = learnable_temperature
        self.text_prefix_length = text_prefix_length
        self.use_reconstructor = use_reconstructor
        self.reconstructor_config = dict(reconstructor_config or TABLE7_UNET_CONFIG)
        self.image_tokenizer_config = dict(image_tokenizer_config or KL16_IMAGE_TOKENIZER_CONFIG)
        self.reconstruction_image_size = reconstruction_image_size
        self.image_mean = list(image_mean or CLIP_IMAGE_MEAN)
        self.image_std = list(image_std or CLIP_IMAGE_STD)
        self.num_diffusion_steps = num_diffusion_steps
        self.diffusion_beta_start = diffusion_beta_start
        self.diffusion_beta_end = diffusion_beta_end
        self.components = {role: dict(info) for role, info in (components or {}).items()}
        if tie_word_embeddings is None:
            tie_word_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_lare()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> LaReConfig:
        """Build from a dict; a config of another model type is refused (it would load as garbage)."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"This config has model_type={model_type!r}, not {cls.model_type!r}: it belongs to another model. "
                "Load it with AutoConfig / its own class, or assemble a LaRe checkpoint from that model with "
                "`lare build --vision DIR --text DIR --output DIR`."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def patch_grid_size(self) -> int:
        """Side of the square patch grid of the vision tower (16 for CLIP-ViT-L/14 at 224 px)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def image_grid_offset(self) -> int:
        """Image tokens before the patch grid in V_T: 1 when `vision_feature_select_strategy="full"` keeps CLIP's
        CLS token, else 0. Those tokens are fed to the LM but are not cells of the saliency grid."""
        grid = self.patch_grid_size
        return self.image_seq_length - grid * grid

    @property
    def vision_feature_layers(self) -> list[int]:
        """`vision_feature_layer` as a list (one entry for an integer)."""
        layer = self.vision_feature_layer
        return list(layer) if isinstance(layer, list) else [layer]

    @property
    def effective_window_size(self) -> int:
        """Side of the refocused window V_s (Eq. 1-2): `window_size`, or the whole patch grid when the sliding window
        is ablated (`use_sliding_window=False`, Table 3)."""
        return self.window_size if self.use_sliding_window else self.patch_grid_size

    def validate_lare(self) -> None:
        """Check types, ranges and that the LaRe hyperparameters fit together; raises ValueError naming the field,
        its value and the fix."""
        for name in ("image_token_id", "latent_start_token_id", "latent_token_id", "latent_end_token_id"):
            check_int(name, getattr(self, name), minimum=0)
        for name in (
            "image_seq_length",
            "latent_tokens_per_step",
            "extractor_num_layers",
            "extractor_num_heads",
            "window_size",
            "window_stride",
            "text_prefix_length",
            "reconstruction_image_size",
            "num_diffusion_steps",
        ):
            check_int(name, getattr(self, name), minimum=1)
        check_int("max_latent_steps", self.max_latent_steps, minimum=0)
        check_int(
            "num_latent_steps",
            self.num_latent_steps,
            minimum=0,
            maximum=self.max_latent_steps,
            fix=f"Lower it or raise max_latent_steps={self.max_latent_steps}.",
        )
        for name in ("extractor_hidden_size", "extractor_intermediate_size"):
            check_int(name, getattr(self, name), minimum=1, allow_none=True)
        for name in (
            "multimodal_projector_bias",
            "use_extractor",
            "use_sliding_window",
            "learnable_temperature",
            "use_reconstructor",
        ):
            check_bool(name, getattr(self, name))
        for role, info in self.components.items():
            if not isinstance(info, dict) or not isinstance(info.get("source"), str):
                raise ValueError(
                    f"components[{role!r}] must be a dict with a 'source' string (and an optional 'license'), got "
                    f"{info!r}."
                )
        for name in ("sym_loss_weight", "image_loss_weight", "text_loss_weight", "window_loss_weight"):
            check_float(name, getattr(self, name), minimum=0.0, fix="Use 0 to switch the loss term off.")
        check_float("alignment_temperature", self.alignment_temperature, minimum=0.0, exclusive_minimum=True)
        check_choice("window_selection", self.window_selection, list(WINDOW_SELECTIONS))
        check_float("window_temperature", self.window_temperature, minimum=0.0, exclusive_minimum=True)
        if self.window_temperature_end is not None:
            check_float("window_temperature_end", self.window_temperature_end, minimum=0.0, exclusive_minimum=True)
        check_float(
            "diffusion_beta_start", self.diffusion_beta_start, minimum=0.0, maximum=1.0, exclusive_minimum=True
        )
        check_float("diffusion_beta_end", self.diffusion_beta_end, minimum=self.diffusion_beta_start, maximum=1.0)
        check_choice("projector_hidden_act", self.projector_hidden_act, sorted(ACT2FN))
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"{name} must hold 3 values (R, G, B), got {values!r}.")
            for channel, value in enumerate(values):
                check_float(f"{name}[{channel}]", value, minimum=0.0, exclusive_minimum=name == "image_std")
        grid = self.patch_grid_size
        check_choice("vision_feature_select_strategy", self.vision_feature_select_strategy, ["default", "full"])
        self._validate_vision_feature_layer()
        offset = self.image_seq_length - grid * grid
        if offset not in ((0, 1) if self.vision_feature_select_strategy == "full" else (0,)):
            raise ValueError(
                f"image_seq_length={self.image_seq_length} does not fit the vision tower's {grid}x{grid} patch grid "
                f"with vision_feature_select_strategy={self.vision_feature_select_strategy!r}: LaRe's sliding window "
                f"needs every patch of the grid, so set image_seq_length={grid * grid} (no CLS token in the "
                f"features), or {grid * grid + 1} with 'full' and a tower that has a CLS token (CLIP). A tower "
                "without a CLS token (SigLIP) with 'default' loses a real patch; use 'full' for it."
            )
        if not 1 <= self.window_size <= grid:
            raise ValueError(
                f"window_size={self.window_size} must be between 1 and the patch grid side {grid}; set "
                f"window_size <= {grid}."
            )
        hidden = self.extractor_hidden_size or self.text_config.hidden_size
        if hidden % self.extractor_num_heads != 0:
            raise ValueError(
                f"The Extractor width {hidden} is not divisible by extractor_num_heads={self.extractor_num_heads}; "
                "choose a number of heads that divides it."
            )
        num_layers = self.text_config.num_hidden_layers
        for layer in self.saliency_layers or []:
            check_int("saliency_layers entry", layer)
            if not -num_layers <= layer < num_layers:
                raise ValueError(
                    f"saliency_layers entry {layer} is out of range for a {num_layers}-layer LM; use layers "
                    f"{-num_layers} ... {num_layers - 1}."
                )

    def _validate_vision_feature_layer(self) -> None:
        """An index (or a non-empty list of indices) of the vision tower's hidden states."""
        layers = self.vision_feature_layer
        if isinstance(layers, list) and not layers:
            raise ValueError("vision_feature_layer=[] selects no features; give an index or a non-empty list.")
        num_vision_layers = getattr(self.vision_config, "num_hidden_layers", None)
        for layer in self.vision_feature_layers:
            if num_vision_layers is None:
                check_int("vision_feature_layer", layer)
            else:
                check_int("vision_feature_layer", layer, minimum=-(num_vision_layers + 1), maximum=num_vision_layers)

    @classmethod
    def check_field_names(cls, overrides: dict[str, Any], what: str = "LaReConfig field") -> None:
        """Refuse override keys that are not `LaReConfig` arguments, suggesting the closest valid name."""
        check_known_keys(overrides, lare_config_fields(), what)


def lare_config_fields() -> list[str]:
    """Names of the `LaReConfig` arguments (what `lare build --set` and config overrides may set)."""
    import inspect

    parameters = inspect.signature(LaReConfig.__init__).parameters
    return [name for name, p in parameters.items() if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


__all__ = [
    "LaReConfig",
    "lare_config_fields",
    "LARE_SPECIAL_TOKENS",
    "TABLE7_UNET_CONFIG",
    "KL16_IMAGE_TOKENIZER_CONFIG",
]

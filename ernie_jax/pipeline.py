"""ErnieImagePipeline: prompt -> (prompt enhancer) -> text encoder -> denoising loop -> VAE decode.

Mirrors diffusers `ErnieImagePipeline.__call__` (pipeline_ernie_image.py) with its argument names and
meanings; given the same initial `latents` (the reference's `[B, 128, H/16, W/16]` layout) it returns
the same images. Differences by design: noise comes from `seed` through JAX's PRNG (pass `latents` to
share noise with torch), and every stage is compiled once per shape: prompts are tokenized one at a
time as the reference does, then encoded together, right-padded to a multiple of `text_bucket`, with
key-padding masks (which leaves the valid positions unchanged); the text batch of the denoising loop is
padded the same way, its padded keys masked.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax import sampling
from ernie_jax.models import vae as vae_lib
from ernie_jax.tokenizer import Tokenizer

VAE_SCALE_FACTOR = 16  # 8 from the VAE, 2 from the 2x2 latent patchify
OUTPUT_TYPES = ("pil", "np", "latent")
# The released folders do not say which model they hold; these are the recommended settings.
PRESETS = {"ernie-image": dict(num_inference_steps=50, guidance_scale=4.0),
           "ernie-image-turbo": dict(num_inference_steps=8, guidance_scale=1.0)}
# Bound on the PE's rewrite when its tokenizer sets no model_max_length (the reference's default length).
PE_MAX_NEW_TOKENS = 2048
SCHEDULER_UNSUPPORTED = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                         "shift_terminal", "invert_sigmas", "stochastic_sampling")


@dataclasses.dataclass
class ErnieImagePipelineOutput:
    """`images`: PIL images, `[B, H, W, 3]` floats in [0, 1] ("np") or latents ("latent");
    `revised_prompts`: the prompt enhancer's rewrites, or None when it did not run."""

    images: list | np.ndarray | jax.Array
    revised_prompts: list[str] | None
    seed: int | None = None


def scheduler_shift(config: dict) -> float:
    """The flow-matching shift of a `scheduler_config.json`, refusing options this sampler does not implement."""
    enabled = [name for name in SCHEDULER_UNSUPPORTED if config.get(name)]
    if enabled:
        raise ValueError(f"scheduler options not supported by ernie_jax's sampler: {enabled}")
    if config.get("num_train_timesteps", 1000) != 1000:
        raise ValueError(f"scheduler num_train_timesteps must be 1000, got {config['num_train_timesteps']}")
    return float(config.get("shift", 1.0))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _jit_method(name: str):
    """A jitted pure function calling `module.<name>(*args)` on (graphdef, state): compiled once per
    graphdef and shapes, shared by every pipeline holding an equal module."""

    def call(graphdef, state, *args):
        return getattr(nnx.merge(graphdef, state), name)(*args)

    return jax.jit(call, static_argnums=(0,))


_encode_text = _jit_method("encode")


def _decode_images(graphdef, state, latents, tile_size):
    """Packed latents `[B, 128, h, w]` -> images `[B, 16h, 16w, 3]` in [0, 1], in the VAE's dtype.

    Images are decoded one after another, so activation memory does not grow with the batch (a 1024^2
    decode needs about 3.2 GB of temporaries in bf16, most of it the mid-block attention);
    `tile_size` (latent pixels of the VAE, 8x smaller than the image) bounds it for larger images.
    """
    vae = nnx.merge(graphdef, state)
    images = jax.lax.map(lambda one: vae_lib.decode_packed_latents(vae, one[None], tile_size)[0], latents)
    # VaeImageProcessor.postprocess: (x * 0.5 + 0.5).clamp(0, 1) in the tensor's dtype.
    return jnp.clip(images * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)


_decode_images_jit = jax.jit(_decode_images, static_argnums=(0, 3))


class ErnieImagePipeline:
    """Text-to-image with ERNIE-Image (or ERNIE-Image-Turbo) weights.

    Components are ernie_jax modules (transformer, vae, text_encoder, optional pe) and `Tokenizer`s.
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer: Tokenizer | None, *, shift: float = 4.0,
                 pe=None, pe_tokenizer: Tokenizer | None = None, pe_generation_config: dict | None = None,
                 text_bucket: int = 64):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.shift = shift
        self.pe = pe
        self.pe_tokenizer = pe_tokenizer
        self.pe_generation_config = dict(pe_generation_config or {})
        self.text_bucket = text_bucket
        self.vae_tile_size = None
        self._lora_base = None

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path, dtype="bfloat16", *, text_bucket: int = 64) -> "ErnieImagePipeline":
        """Loads a diffusers-format ERNIE-Image folder (model_index.json; transformer, vae, text_encoder,
        tokenizer, scheduler, optional pe and pe_tokenizer) or one written by `conversions.convert`."""
        from conversions import mistral, transformer, vae
        from conversions.safetensors_io import CheckpointError

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: no model_index.json (not an ERNIE-Image pipeline folder)")
        index = json.loads((path / "model_index.json").read_text())

        def present(name):
            entry = index.get(name)
            return isinstance(entry, list) and entry[0] is not None and (path / name).is_dir()

        for required in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not present(required):
                raise CheckpointError(f"{path}: the pipeline has no {required}/ component")
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        pe = pe_tokenizer = None
        generation_config = {}
        if present("pe") and present("pe_tokenizer"):
            pe = mistral.load_prompt_enhancer(path / "pe", dtype)
            pe_tokenizer = Tokenizer.from_folder(path / "pe_tokenizer")
            if (path / "pe" / "generation_config.json").is_file():
                generation_config = json.loads((path / "pe" / "generation_config.json").read_text())
        return cls(
            transformer.load_transformer(path / "transformer", dtype),
            vae.load_vae(path / "vae", dtype),
            mistral.load_text_encoder(path / "text_encoder", dtype),
            Tokenizer.from_folder(path / "tokenizer"),
            shift=scheduler_shift(scheduler_config), pe=pe, pe_tokenizer=pe_tokenizer,
            pe_generation_config=generation_config, text_bucket=text_bucket)

    # ------------------------------------------------------------------------------------------- text

    def tokenize(self, prompt: str) -> list[int]:
        """The reference's `encode_prompt` tokenization: special tokens, truncation, [bos] (or [0]) if empty."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=True, truncation=True)
        if not ids:
            bos = self.tokenizer.bos_token_id
            ids = [bos if bos is not None else 0]
        return ids

    def encode_prompt(self, prompts: list[str]) -> list[jax.Array]:
        """Text features `[T_i, D]` (the text encoder's hidden_states[-2]) of each prompt, in the
        transformer's dtype."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer: pass prompt_embeds instead")
        token_ids = [self.tokenize(p) for p in prompts]
        lengths = np.array([len(ids) for ids in token_ids], np.int32)
        batch = np.zeros((len(token_ids), _round_up(int(lengths.max()), self.text_bucket)), np.int32)
        for row, ids in zip(batch, token_ids, strict=True):
            row[: len(ids)] = ids
        graphdef, state = nnx.split(self.text_encoder)
        hidden = _encode_text(graphdef, state, jnp.asarray(batch), jnp.asarray(lengths))
        hidden = hidden.astype(self.transformer.dtype)
        return [hidden[i, :n] for i, n in enumerate(lengths)]

    def enhance_prompt(self, prompt: str, width: int = 1024, height: int = 1024, temperature: float = 0.6,
                       top_p: float = 0.95, seed: int = 0, system_prompt: str | None = None) -> str:
        """The prompt enhancer's rewrite of `prompt` (reference `_enhance_prompt_with_pe`).

        The user message is the JSON {"prompt", "width", "height"}; sampling follows transformers' generate
        with the PE folder's generation config (top_k 50 unless it says otherwise); `temperature=0` is greedy.
        """
        from ernie_jax.models import mistral

        if self.pe is None or self.pe_tokenizer is None:
            raise ValueError("this pipeline has no prompt enhancer (pe/ and pe_tokenizer/)")
        user = json.dumps({"prompt": prompt, "width": width, "height": height}, ensure_ascii=False)
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
        messages.append({"role": "user", "content": user})
        text = self.pe_tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        prompt_ids = np.asarray([self.pe_tokenizer.encode(text, truncation=False)], np.int32)
        # transformers samples unless temperature and top_p are both 1.0.
        do_sample = temperature != 0 and (temperature != 1.0 or top_p != 1.0)
        new_ids = mistral.generate(
            self.pe, prompt_ids, max_new_tokens=min(self.pe_tokenizer.model_max_length, PE_MAX_NEW_TOKENS),
            eos_token_id=self.pe_tokenizer.eos_token_id, pad_token_id=self.pe_tokenizer.pad_token_id,
            temperature=temperature if do_sample else 0.0, top_k=self.pe_generation_config.get("top_k", 50),
            top_p=top_p, seed=seed)
        return self.pe_tokenizer.decode(new_ids[0], skip_special_tokens=True).strip()

    # -------------------------------------------------------------------------------------------- call

    def _check_embeds(self, embeds, name: str) -> list[jax.Array]:
        width = self.transformer.config.text_in_dim
        checked = []
        for i, e in enumerate(embeds):
            e = jnp.asarray(e)
            if e.ndim == 3 and e.shape[0] == 1:
                e = e[0]
            if e.ndim != 2 or e.shape[1] != width or e.shape[0] == 0:
                raise ValueError(f"{name}[{i}] has shape {tuple(e.shape)}; expected [T, {width}] with T >= 1")
            checked.append(e.astype(self.transformer.dtype))
        return checked

    def __call__(self, prompt=None, negative_prompt="", height: int = 1024, width: int = 1024,
                 num_inference_steps: int = 50, guidance_scale: float = 4.0, num_images_per_prompt: int = 1,
                 seed: int | None = None, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 output_type: str = "pil", use_pe: bool = True) -> ErnieImagePipelineOutput:
        # Every check happens before any compute.
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else (None if prompt is None else list(prompt))
        batch = len(prompts) if prompts is not None else len(prompt_embeds)
        if batch == 0:
            raise ValueError("the prompt list is empty")
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, (int, np.integer)) or size <= 0 or size % VAE_SCALE_FACTOR:
                raise ValueError(f"{name} must be a positive multiple of {VAE_SCALE_FACTOR}, got {size}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        sigmas = sampling.flow_match_sigmas(num_inference_steps, self.shift)
        use_cfg = guidance_scale > 1.0
        negative = [negative_prompt] * batch if negative_prompt is None or isinstance(negative_prompt, str) \
            else list(negative_prompt)
        negative = ["" if n is None else n for n in negative]
        if len(negative) != batch:
            raise ValueError(f"negative_prompt has {len(negative)} entries for {batch} prompts")
        if prompt_embeds is not None:
            prompt_embeds = self._check_embeds(prompt_embeds, "prompt_embeds")
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = self._check_embeds(negative_prompt_embeds, "negative_prompt_embeds")
            if len(negative_prompt_embeds) != batch:
                raise ValueError(f"negative_prompt_embeds has {len(negative_prompt_embeds)} entries for {batch} "
                                 f"prompts")
        total = batch * num_images_per_prompt
        latent_shape = (total, self.transformer.config.in_channels, height // VAE_SCALE_FACTOR,
                        width // VAE_SCALE_FACTOR)
        if latents is not None:
            latents = jnp.asarray(latents)
            if latents.shape != latent_shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {latent_shape}")
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))

        revised = None
        if prompts is not None and use_pe and self.pe is not None and self.pe_tokenizer is not None:
            prompts = [self.enhance_prompt(p, width=width, height=height, seed=seed) for p in prompts]
            revised = list(prompts)
        positive = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompts)
        positive = [e for e in positive for _ in range(num_images_per_prompt)]
        text = positive
        if use_cfg:
            negative_features = negative_prompt_embeds if negative_prompt_embeds is not None \
                else self.encode_prompt(negative)
            text = [e for e in negative_features for _ in range(num_images_per_prompt)] + positive
        lengths = np.array([e.shape[0] for e in text], np.int32)
        text_bth = jnp.stack([sampling.pad_text(e[None], _round_up(int(lengths.max()), self.text_bucket))[0]
                              for e in text])

        dtype = self.transformer.dtype
        if latents is None:
            latents = jax.random.normal(jax.random.key(seed), latent_shape, dtype)
        graphdef, params = nnx.split(self.transformer)
        latents = sampling._denoise_loop_jit(graphdef, params, latents.astype(dtype), text_bth,
                                             jnp.asarray(lengths), sigmas, jnp.float32(guidance_scale),
                                             use_cfg=use_cfg)
        if output_type == "latent":
            return ErnieImagePipelineOutput(latents, revised, seed)
        vae_graphdef, vae_state = nnx.split(self.vae)
        images = np.asarray(_decode_images_jit(vae_graphdef, vae_state, latents.astype(self.vae.dtype),
                                               self.vae_tile_size), np.float32)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]
        return ErnieImagePipelineOutput(images, revised, seed)

    def enable_vae_tiling(self, tile_size: int = 64) -> None:
        """Decode with overlapping tiles of `tile_size` VAE-latent pixels (as diffusers' `vae.enable_tiling`):
        bounded memory for very large images, at the cost of tile seams (GroupNorm statistics are per tile)."""
        self.vae_tile_size = tile_size

    def disable_vae_tiling(self) -> None:
        self.vae_tile_size = None

    # -------------------------------------------------------------------------------------------- LoRA

    def load_lora_weights(self, path, scale: float = 1.0) -> list[str]:
        """Merges a LoRA file into the transformer (diffusers, PEFT or AI-Toolkit keys); returns the modules
        changed. Loading several stacks them; `unload_lora_weights` restores the original weights."""
        from conversions import lora

        base = nnx.to_pure_dict(nnx.state(self.transformer, nnx.Param))
        changed = lora.apply_lora(self.transformer, path, scale)
        if self._lora_base is None:
            self._lora_base = base
        return changed

    def unload_lora_weights(self) -> None:
        """Restores the transformer's weights as they were before the first `load_lora_weights`."""
        if self._lora_base is not None:
            state = nnx.state(self.transformer, nnx.Param)
            nnx.replace_by_pure_dict(state, self._lora_base)
            nnx.update(self.transformer, state)
            self._lora_base = None

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
import functools
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from ernie_jax import parallel, sampling
from ernie_jax.models import mistral as mistral_lib
from ernie_jax.models import vae as vae_lib
from ernie_jax.tokenizer import Tokenizer

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


def vae_scale_factor(vae) -> int:
    """Image pixels per latent token along each side: the VAE's downsampling times the 2x2 latent patchify
    (16 for the released VAE). diffusers' ErnieImagePipeline computes it the same way,
    2 ** len(block_out_channels)."""
    return 2 ** len(vae.config.block_out_channels)


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


def _encode(graphdef, state, input_ids, lengths):
    """The text encoder's features `[B, T, D]` of right-padded `input_ids [B, T]` (valid lengths `[B]`)."""
    return nnx.merge(graphdef, state).encode(input_ids, lengths)


# Compiled once per graphdef and shapes, shared by every pipeline holding an equal module.
_encode_text = jax.jit(_encode, static_argnums=(0,))


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


def _component_rules(mesh, rules: Mapping[str, parallel.Rules] | None) -> dict[str, parallel.Rules] | None:
    """Each component's rule table on `mesh` (the inference defaults, `rules` replacing some), None without one."""
    if mesh is None:
        if rules is not None:
            raise ValueError("rules place the components on a mesh: pass mesh too")
        return None
    return parallel.component_rules("inference", rules)


def _on_pipeline_mesh(method):
    """`method` run with the pipeline's mesh (Auto axes) as JAX's context mesh: its eager steps on the
    pipeline's arrays then also work under a user's `jax.set_mesh` of a mesh with Explicit axes."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.mesh is None:
            return method(self, *args, **kwargs)
        with jax.set_mesh(self.mesh):
            return method(self, *args, **kwargs)

    return run


class ErnieImagePipeline:
    """Text-to-image with ERNIE-Image (or ERNIE-Image-Turbo) weights.

    Components are ernie_jax modules (transformer, vae, text_encoder, optional pe) and `Tokenizer`s.

    With a device `mesh` (any `jax.sharding.Mesh` with the axes data, fsdp, context, tensor, however made;
    `pipe.mesh` holds it with Auto axes, see parallel.normalize_mesh), every component is placed by its
    logical-axis rule table (`rules`: component -> table, over parallel.COMPONENT_RULES["inference"]: weights
    split over fsdp and tensor, the VAE's whole) and every stage runs as a program compiled with
    explicit input and output shardings: the text encoder and the VAE split their batch over the batch axes
    (padded to a multiple of the number of batch shards), the PE's decode loop and the denoising loop split
    theirs where it divides (otherwise it stays whole) and keep the KV cache's heads split as the weights'.
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer: Tokenizer | None, *, shift: float = 4.0,
                 pe=None, pe_tokenizer: Tokenizer | None = None, pe_generation_config: dict | None = None,
                 text_bucket: int = 64, mesh=None, rules: Mapping[str, parallel.Rules] | None = None):
        self.transformer = transformer
        self.vae = vae
        self.vae_scale_factor = vae_scale_factor(vae)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.shift = shift
        self.pe = pe
        self.pe_tokenizer = pe_tokenizer
        self.pe_generation_config = dict(pe_generation_config or {})
        self.text_bucket = text_bucket
        self.vae_tile_size = None
        self._lora_base = None
        self.mesh = None if mesh is None else parallel.normalize_mesh(mesh)
        self.rules = _component_rules(mesh, rules)
        self._sharded_programs = {}
        if mesh is not None:
            for name in ("transformer", "vae", "text_encoder", "pe"):
                if getattr(self, name) is not None:
                    parallel.shard_model(getattr(self, name), self.mesh, self.rules[name])

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path, dtype="bfloat16", *, mesh=None, rules: Mapping[str, parallel.Rules] | None = None,
                        text_bucket: int = 64) -> "ErnieImagePipeline":
        """Loads a diffusers-format ERNIE-Image folder (model_index.json; transformer, vae, text_encoder,
        tokenizer, scheduler, optional pe and pe_tokenizer) or one written by `conversions.convert`.

        With a `mesh`, every tensor is read straight into its sharding under the component's rule table
        (`rules`: component -> table, replacing parallel.COMPONENT_RULES["inference"] entries)."""
        from conversions import mistral, transformer, vae
        from conversions.safetensors_io import CheckpointError

        mesh = None if mesh is None else parallel.normalize_mesh(mesh)
        component_rules = _component_rules(mesh, rules)

        def placement(component: str) -> dict:
            return {} if mesh is None else {"mesh": mesh, "axis_rules": component_rules[component]}

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
            pe = mistral.load_prompt_enhancer(path / "pe", dtype, **placement("pe"))
            pe_tokenizer = Tokenizer.from_folder(path / "pe_tokenizer")
            if (path / "pe" / "generation_config.json").is_file():
                generation_config = json.loads((path / "pe" / "generation_config.json").read_text())
        return cls(
            transformer.load_transformer(path / "transformer", dtype, **placement("transformer")),
            vae.load_vae(path / "vae", dtype, **placement("vae")),
            mistral.load_text_encoder(path / "text_encoder", dtype, **placement("text_encoder")),
            Tokenizer.from_folder(path / "tokenizer"),
            shift=scheduler_shift(scheduler_config), pe=pe, pe_tokenizer=pe_tokenizer,
            pe_generation_config=generation_config, text_bucket=text_bucket, mesh=mesh, rules=rules)

    # ----------------------------------------------------------------------------------- sharded programs

    def _run_sharded(self, key, build, *args):
        """Runs the program `build()` returns as (jitted function, its in_shardings), built once per `key`,
        on `args` placed in those shardings first."""
        if key not in self._sharded_programs:
            self._sharded_programs[key] = build()
        program, in_shardings = self._sharded_programs[key]
        return program(*parallel.put(args, in_shardings))

    def _in_shardings(self, component: str, state, *batch_shapes) -> tuple:
        """The shardings of `state` under the component's rules, then of an array per batch-leading shape."""
        rules = self.rules[component]
        return (parallel.state_shardings(state, self.mesh, rules),
                *(parallel.batch_sharding(self.mesh, rules, shape) for shape in batch_shapes))

    def _padded_batch(self, component: str, batch: int) -> int:
        """`batch` rounded up to a multiple of the batch shards of `component` (unchanged without a mesh)."""
        if self.mesh is None:
            return batch
        return _round_up(batch, parallel.batch_shard_count(self.mesh, self.rules[component]))

    def _encode_sharded(self, graphdef, state, input_ids: np.ndarray, lengths: np.ndarray) -> jax.Array:
        """`_encode` with the weights placed by the text encoder's rules and the batch split."""
        mesh, rules = self.mesh, self.rules["text_encoder"]

        def build():
            in_shardings = self._in_shardings("text_encoder", state, input_ids.shape, lengths.shape)
            out_shape = (*input_ids.shape, self.text_encoder.config.hidden_size)
            out_sharding = parallel.data_sharding(mesh, rules, mistral_lib.ACTIVATION_AXES, out_shape)
            return parallel.jit_sharded(functools.partial(_encode, graphdef), mesh, rules, in_shardings,
                                        out_sharding), in_shardings

        return self._run_sharded(("encode", graphdef, input_ids.shape), build, state, input_ids, lengths)

    def _generate_loop(self):
        """The PE's decode loop for `mistral.generate(loop=...)`: None (its single-device jit) without a mesh,
        else compiled with the weights placed by the PE's rules, the prompt batch split where it divides,
        and the tokens replicated (every process reads them)."""
        if self.mesh is None:
            return None
        mesh, rules = self.mesh, self.rules["pe"]

        def loop(graphdef, params, prompt_ids, lengths, key, *scalars, max_new_tokens: int):
            def build():
                replicated = parallel.replicated(mesh)
                in_shardings = (*self._in_shardings("pe", params, prompt_ids.shape, lengths.shape),
                                *(replicated,) * (1 + len(scalars)))
                program = functools.partial(mistral_lib._generate_loop, graphdef, max_new_tokens=max_new_tokens)
                return parallel.jit_sharded(program, mesh, rules, in_shardings, (replicated, replicated)), in_shardings

            key_shapes = (prompt_ids.shape, tuple(np.shape(s) for s in scalars), max_new_tokens)
            return self._run_sharded(("generate", graphdef, key_shapes), build, params, prompt_ids, lengths, key,
                                     *scalars)

        return loop

    def _decode_sharded(self, graphdef, state, latents: jax.Array) -> jax.Array:
        """`_decode_images` per device in `shard_map`: the batch split over the VAE's batch axes, the weights
        whole on every device (gathered first if the VAE's rules split them)."""
        mesh, rules, tile_size = self.mesh, self.rules["vae"], self.vae_tile_size

        def build():
            in_shardings = self._in_shardings("vae", state, latents.shape)
            batch, _, height, width = latents.shape
            out_sharding = parallel.batch_sharding(mesh, rules, (batch, height * self.vae_scale_factor,
                                                                 width * self.vae_scale_factor, 3))
            decode = jax.shard_map(functools.partial(_decode_images, graphdef, tile_size=tile_size), mesh=mesh,
                                   in_specs=(PartitionSpec(), in_shardings[1].spec),
                                   out_specs=out_sharding.spec)
            # Plain jit: inside shard_map every mesh axis is manual, so no activation rules apply.
            program = jax.jit(decode, in_shardings=in_shardings, out_shardings=out_sharding)
            return parallel.ProgramOnMesh(program, mesh), in_shardings

        return self._run_sharded(("decode", graphdef, latents.shape, latents.dtype, tile_size), build, state,
                                 latents)

    # ------------------------------------------------------------------------------------------- text

    def tokenize(self, prompt: str) -> list[int]:
        """The reference's `encode_prompt` tokenization: special tokens, truncation, [bos] (or [0]) if empty."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=True, truncation=True)
        if not ids:
            bos = self.tokenizer.bos_token_id
            ids = [bos if bos is not None else 0]
        return ids

    @_on_pipeline_mesh
    def encode_prompt(self, prompts: list[str]) -> list[jax.Array]:
        """Text features `[T_i, D]` (the text encoder's hidden_states[-2]) of each prompt, in the
        transformer's dtype (the text encoder's in a pipeline built without a transformer)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer: pass prompt_embeds instead")
        token_ids = [self.tokenize(p) for p in prompts]
        # With a mesh, rows of one token pad the batch to a multiple of its shards.
        lengths = np.ones(self._padded_batch("text_encoder", len(token_ids)), np.int32)
        lengths[: len(token_ids)] = [len(ids) for ids in token_ids]
        batch = np.zeros((len(lengths), _round_up(int(lengths.max()), self.text_bucket)), np.int32)
        for row, ids in zip(batch, token_ids):
            row[: len(ids)] = ids
        graphdef, state = nnx.split(self.text_encoder)
        if self.mesh is None:
            hidden = _encode_text(graphdef, state, jnp.asarray(batch), jnp.asarray(lengths))
        else:
            hidden = self._encode_sharded(graphdef, state, batch, lengths)
        if self.transformer is not None:
            hidden = hidden.astype(self.transformer.dtype)
        return [hidden[i, :n] for i, n in enumerate(lengths[: len(token_ids)])]

    @_on_pipeline_mesh
    def enhance_prompt(self, prompt: str | list[str], width: int = 1024, height: int = 1024,
                       temperature: float = 0.6, top_p: float = 0.95, seed: int = 0,
                       system_prompt: str | None = None) -> str | list[str]:
        """The prompt enhancer's rewrite of `prompt` (reference `_enhance_prompt_with_pe`); for a list of
        prompts, the list of rewrites, generated as one batch (so sampled rewrites depend on the batch: the
        random draws are the batch's, not each prompt's).

        The user message is the JSON {"prompt", "width", "height"}; sampling follows transformers' generate
        with the PE folder's generation config (top_k 50 unless it says otherwise); `temperature=0` is greedy.
        """
        if self.pe is None or self.pe_tokenizer is None:
            raise ValueError("this pipeline has no prompt enhancer (pe/ and pe_tokenizer/)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("the prompt list is empty")
        encoded = []
        for text in prompts:
            user = json.dumps({"prompt": text, "width": width, "height": height}, ensure_ascii=False)
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
            messages.append({"role": "user", "content": user})
            chat = self.pe_tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            encoded.append(self.pe_tokenizer.encode(chat, truncation=False))
        lengths = np.array([len(ids) for ids in encoded], np.int32)
        prompt_ids = np.zeros((len(encoded), lengths.max()), np.int32)
        for row, ids in zip(prompt_ids, encoded, strict=True):
            row[: len(ids)] = ids
        # transformers samples unless temperature and top_p are both 1.0.
        do_sample = temperature != 0 and (temperature != 1.0 or top_p != 1.0)
        new_ids = mistral_lib.generate(
            self.pe, prompt_ids, lengths, max_new_tokens=min(self.pe_tokenizer.model_max_length, PE_MAX_NEW_TOKENS),
            eos_token_id=self.pe_tokenizer.eos_token_id, pad_token_id=self.pe_tokenizer.pad_token_id,
            temperature=temperature if do_sample else 0.0, top_k=self.pe_generation_config.get("top_k", 50),
            top_p=top_p, seed=seed, loop=self._generate_loop())
        rewrites = [self.pe_tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
        return rewrites[0] if isinstance(prompt, str) else rewrites

    # -------------------------------------------------------------------------------------------- call

    def _check_embeds(self, embeds, name: str) -> list[np.ndarray]:
        width = self.transformer.config.text_in_dim
        checked = []
        for i, e in enumerate(embeds):
            e = np.asarray(e)  # through the host: see __call__'s latents
            if e.ndim == 3 and e.shape[0] == 1:
                e = e[0]
            if e.ndim != 2 or e.shape[1] != width or e.shape[0] == 0:
                raise ValueError(f"{name}[{i}] has shape {tuple(e.shape)}; expected [T, {width}] with T >= 1")
            checked.append(e.astype(self.transformer.dtype))
        return checked

    def check_image_size(self, height, width) -> None:
        """Raises ValueError unless both sides are positive multiples of this model's pixels per latent token
        (`vae_scale_factor`: 16 for the released VAE)."""
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, (int, np.integer)) or size <= 0 or size % self.vae_scale_factor:
                raise ValueError(f"{name} must be a positive multiple of {self.vae_scale_factor}, got {size}")

    @_on_pipeline_mesh
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
        self.check_image_size(height, width)
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
        latent_shape = (total, self.transformer.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        if latents is not None:
            # The caller's arrays go through the host: one committed to a single device would clash with the
            # pipeline's mesh, which is the context mesh of the eager steps below.
            latents = np.asarray(latents)
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
        args = (latents.astype(dtype), text_bth, jnp.asarray(lengths))
        if self.mesh is None:
            latents = sampling._denoise_loop_jit(graphdef, params, *args, sigmas, jnp.float32(guidance_scale),
                                                 use_cfg=use_cfg)
        else:
            loop = sampling._sharded_denoise_loop(graphdef, params, use_cfg, self.mesh, self.rules["transformer"],
                                                  tuple(x.shape for x in args))
            latents = loop(params, *args, sigmas, jnp.float32(guidance_scale))
        if output_type == "latent":
            return ErnieImagePipelineOutput(latents, revised, seed)
        images = self.decode_latents(latents)
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]
        return ErnieImagePipelineOutput(images, revised, seed)

    @_on_pipeline_mesh
    def decode_latents(self, latents) -> np.ndarray:
        """Packed latents `[B, 128, h, w]` -> images `[B, 16h, 16w, 3]` float32 in [0, 1] on the host.

        With a mesh, the batch is zero-padded to a multiple of the VAE's batch shards and each device decodes
        its share."""
        graphdef, state = nnx.split(self.vae)
        latents = jnp.asarray(latents).astype(self.vae.dtype)
        if self.mesh is None:
            return np.asarray(_decode_images_jit(graphdef, state, latents, self.vae_tile_size), np.float32)
        total = latents.shape[0]
        padding = ((0, self._padded_batch("vae", total) - total),) + ((0, 0),) * 3
        images = self._decode_sharded(graphdef, state, jnp.pad(latents, padding))
        return parallel.to_host(images)[:total].astype(np.float32)

    def enable_vae_tiling(self, tile_size: int = 64) -> None:
        """Decode with overlapping tiles of `tile_size` VAE-latent pixels (as diffusers' `vae.enable_tiling`):
        bounded memory for very large images, at the cost of tile seams (GroupNorm statistics are per tile)."""
        self.vae_tile_size = tile_size

    def disable_vae_tiling(self) -> None:
        self.vae_tile_size = None

    # -------------------------------------------------------------------------------------------- LoRA

    @_on_pipeline_mesh
    def load_lora_weights(self, path, scale: float = 1.0) -> list[str]:
        """Merges a LoRA file into the transformer (diffusers, PEFT or AI-Toolkit keys); returns the modules
        changed. Loading several stacks them; `unload_lora_weights` restores the original weights."""
        from conversions import lora

        base = nnx.to_pure_dict(nnx.state(self.transformer, nnx.Param))
        changed = lora.apply_lora(self.transformer, path, scale)
        if self._lora_base is None:
            self._lora_base = base
        return changed

    @_on_pipeline_mesh
    def unload_lora_weights(self) -> None:
        """Restores the transformer's weights as they were before the first `load_lora_weights`."""
        if self._lora_base is not None:
            state = nnx.state(self.transformer, nnx.Param)
            nnx.replace_by_pure_dict(state, self._lora_base)
            nnx.update(self.transformer, state)
            self._lora_base = None

"""`python -m conversions.random_checkpoint DST`: random ERNIE-Image weights in the released layouts, for
testing a setup end to end without downloading the real weights.

By default DST receives one transformer folder (`config.json` + `diffusion_pytorch_model.safetensors`,
as the released `transformer/`). With `--pipeline`, DST receives a whole pipeline folder as diffusers
saves it (`model_index.json`, transformer/, vae/, text_encoder/, tokenizer/, scheduler/, and pe/ +
pe_tokenizer/ with `--with-pe`), which both ernie_jax and diffusers load. Every weight is random
(torch-like uniform init), including the ones the reference zero-initialises, so outputs are not
trivially zero; the tokenizers are byte-level BPEs trained on a few sentences. Random weights make
noise images and gibberish prompt rewrites: this checks plumbing, shapes and speed, not quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from conversions import checkpoint_files as files
from conversions import mistral as mistral_weights
from conversions import transformer as weights
from conversions import vae as vae_weights
from conversions.common import atomic_directory, run_command
from conversions.export import parse_size
from conversions.safetensors_io import write_sharded
from ernie_jax.models import mistral
from ernie_jax.models.dit import PRESETS, init_transformer
from ernie_jax.models.vae import VAE_PRESETS, init_vae

DIFFUSERS_VERSION = "0.42.1"
TOKENIZER_CORPUS = [
    "a red circle at the top left and a blue square at the bottom right",
    "a photo of a cat sitting on a wooden table, soft light, 35mm",
    '{"prompt": "a poster with the word ERNIE", "width": 1024, "height": 1024}',
    "一只可爱的小猫坐在窗台上，阳光明媚",
    "rewritten_prompt: a highly detailed illustration of a lighthouse at dusk",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
# Shaped like the PE's template as third-party ports describe it (the released one is not public here).
PE_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}"
    "{%- set system_message = '你是一个提示词改写助手。Rewrite the prompt as JSON.' %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}[SYSTEM_PROMPT]{{ system_message }}[/SYSTEM_PROMPT]\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}[INST]{{ message['content'] }}[/INST]\n"
    "    {%- elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n"
    "    {%- else %}{{ raise_exception('unsupported role ' + message['role']) }}{%- endif %}\n"
    "{%- endfor %}"
)
# Pipeline presets: (transformer, vae, text encoder, prompt enhancer).
PIPELINE_PRESETS = {
    "tiny": ("tiny", "tiny", "tiny_text_encoder", "tiny_pe"),
    "full": ("full", "full", "text_encoder", "pe"),
}


def train_tokenizer(add_bos: bool, vocab_size: int = 400):
    """A byte-level BPE trained on a few sentences; `add_bos` gives it a post-processor adding <s>."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_CORPUS * 4, trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return tokenizer


def write_tokenizer(folder: Path, *, add_bos: bool, model_max_length: int, chat_template: str | None = None):
    """A trained byte-level BPE (`train_tokenizer`) as a tokenizer folder (`save_tokenizer_folder`)."""
    save_tokenizer_folder(folder, train_tokenizer(add_bos), model_max_length=model_max_length,
                          chat_template=chat_template)


def save_tokenizer_folder(folder: Path, tokenizer, *, model_max_length: int, chat_template: str | None = None):
    """A `tokenizers.Tokenizer` that has the `SPECIAL_TOKENS` <s>, </s>, <unk>, <pad> as a tokenizer folder
    as transformers saves one: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": model_max_length}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)


def _write_component(folder: Path, stem: str, tensors: dict, config: dict, max_shard_bytes: int) -> None:
    folder.mkdir(exist_ok=True)
    write_sharded(folder, stem, tensors, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _random_transformer(folder: Path, config, dtype: str, seed: int, max_shard_bytes: int) -> None:
    model = init_transformer(config, seed=seed, param_dtype=files.resolve_dtype(dtype))
    _write_component(folder, "diffusion_pytorch_model", weights.transformer_state_dict(model),
                     weights.diffusers_config(config), max_shard_bytes)


def write_random_transformer(destination, config, *, dtype: str = "float32", seed: int = 0,
                             max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes a randomly initialised transformer with `config` as a diffusers folder at `destination`."""
    with atomic_directory(destination) as staging:
        _random_transformer(staging, config, dtype, seed, max_shard_bytes)


def write_pipeline_components(folder: Path, transformer, vae, text_encoder, *, shift: float = 4.0,
                              max_shard_bytes: int = 5 * 10**9) -> dict:
    """Writes the modules as the transformer/, vae/, text_encoder/ and scheduler/ (flow-matching Euler with
    `shift`) of a diffusers pipeline folder `folder` (which exists); returns the `model_index.json` dict,
    which names a tokenizer/ and no PE, for the caller to complete and write once the tokenizer is there."""
    _write_component(folder / "transformer", "diffusion_pytorch_model", weights.transformer_state_dict(transformer),
                     weights.diffusers_config(transformer.config), max_shard_bytes)
    _write_component(folder / "vae", "diffusion_pytorch_model", vae_weights.vae_state_dict(vae),
                     vae_weights.diffusers_config(vae.config), max_shard_bytes)
    # The full decoder, so that transformers' Mistral3Model loads the folder too (its vision tower,
    # never used by the pipeline, is left for transformers to initialise).
    _write_component(folder / "text_encoder", "model", mistral_weights.state_dict(text_encoder, prefix="language_model."),
                     {"model_type": "mistral3", "architectures": ["Mistral3Model"],
                      "text_config": text_encoder.config.to_hf_text_config()}, max_shard_bytes)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
         "num_train_timesteps": 1000, "shift": shift, "use_dynamic_shifting": False}, indent=2) + "\n")
    return {"_class_name": "ErnieImagePipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "transformer": ["diffusers", "ErnieImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLFlux2"], "text_encoder": ["transformers", "Mistral3Model"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "pe": [None, None], "pe_tokenizer": [None, None]}


def write_random_pipeline(destination, preset: str = "tiny", *, with_pe: bool = False, dtype: str = "float32",
                          seed: int = 0, max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes a random ERNIE-Image pipeline folder (diffusers layout) at `destination`."""
    transformer_preset, vae_preset, encoder_preset, pe_preset = PIPELINE_PRESETS[preset]
    param_dtype = files.resolve_dtype(dtype)
    transformer_config = PRESETS[transformer_preset]
    encoder_config = mistral.PRESETS[encoder_preset]
    if encoder_config.hidden_size != transformer_config.text_in_dim:
        raise ValueError(f"preset {preset!r}: text encoder width {encoder_config.hidden_size} != transformer "
                         f"text_in_dim {transformer_config.text_in_dim}")
    with atomic_directory(destination) as staging:
        index = write_pipeline_components(
            staging, init_transformer(transformer_config, seed=seed, param_dtype=param_dtype),
            init_vae(VAE_PRESETS[vae_preset], seed=seed + 1, param_dtype=param_dtype),
            mistral.init_model(encoder_config, seed=seed + 2, param_dtype=param_dtype),
            max_shard_bytes=max_shard_bytes)
        write_tokenizer(staging / "tokenizer", add_bos=True, model_max_length=512)
        if with_pe:
            pe = mistral.init_model(mistral.PRESETS[pe_preset], seed=seed + 3, param_dtype=param_dtype)
            _write_component(staging / "pe", "model", mistral_weights.state_dict(pe), mistral_weights.hf_config(pe),
                             max_shard_bytes)
            write_tokenizer(staging / "pe_tokenizer", add_bos=True, model_max_length=256,
                            chat_template=PE_CHAT_TEMPLATE)
            index.update(pe=["transformers", "Ministral3ForCausalLM"],
                         pe_tokenizer=["transformers", "PreTrainedTokenizerFast"])
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conversions.random_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dst", help="output folder (must not exist)")
    parser.add_argument("--pipeline", action="store_true", help="write a whole pipeline folder")
    parser.add_argument("--with-pe", action="store_true", help="with --pipeline: include a prompt enhancer")
    parser.add_argument("--preset", default="tiny",
                        help=f"transformer: {sorted(PRESETS)}; pipeline: {sorted(PIPELINE_PRESETS)}")
    parser.add_argument("--num-layers", type=int, help="override the transformer preset's number of blocks")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    presets = PIPELINE_PRESETS if args.pipeline else PRESETS
    if args.preset not in presets:
        parser.error(f"--preset must be one of {sorted(presets)}")
    if args.pipeline:
        write_random_pipeline(args.dst, args.preset, with_pe=args.with_pe, dtype=args.dtype, seed=args.seed,
                              max_shard_bytes=parse_size(args.max_shard_size))
        print(f"wrote {args.dst} ({args.preset} pipeline{' with prompt enhancer' if args.with_pe else ''})")
        return
    config = PRESETS[args.preset]
    if args.num_layers is not None:
        config = dataclasses.replace(config, num_layers=args.num_layers)
    write_random_transformer(args.dst, config, dtype=args.dtype, seed=args.seed,
                             max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote {args.dst} ({args.preset} preset, {config.num_layers} layers, {args.dtype})")


if __name__ == "__main__":
    sys.exit(run_command(main))

"""A tiny random ERNIE-Image pipeline in PyTorch (diffusers + transformers), saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import reference_transformer
from tests.tokenizer_fixtures import PE_CHAT_TEMPLATE, save_tokenizer

YARN = dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=131072, rms_norm_eps=1e-5, max_position_embeddings=262144, rope_parameters=YARN,
            sliding_window=None, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def _perturb_norms(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def reference_vae(seed=0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(32, 64, 64, 64), latent_channels=32, layers_per_block=2,
                             norm_num_groups=32, batch_norm_eps=1e-4, patch_size=(2, 2), sample_size=128).eval()
    _perturb_norms(vae, seed)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def reference_text_encoder(seed=0):
    from transformers import Mistral3Config, Mistral3Model

    torch.manual_seed(seed)
    config = Mistral3Config(text_config=dict(model_type="mistral", **TEXT), vision_config=dict(
        model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        head_dim=16, patch_size=14, image_size=28))
    model = Mistral3Model(config).eval()
    _perturb_norms(model, seed)
    return model


def reference_prompt_enhancer(seed=0):
    from transformers import Ministral3Config, Ministral3ForCausalLM

    torch.manual_seed(seed)
    model = Ministral3ForCausalLM(Ministral3Config(**TEXT, pad_token_id=3)).eval()
    _perturb_norms(model, seed)
    return model


def build_reference_pipeline(folder: Path, with_pe: bool = False):
    """Builds, saves to `folder` and returns the tiny diffusers ErnieImagePipeline (fp32)."""
    from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(save_tokenizer(folder / "_tokenizer_src", add_bos=True))
    pe = pe_tokenizer = None
    if with_pe:
        pe = reference_prompt_enhancer()
        pe_tokenizer = AutoTokenizer.from_pretrained(
            save_tokenizer(folder / "_pe_tokenizer_src", add_bos=True, model_max_length=24,
                           chat_template=PE_CHAT_TEMPLATE))
    pipe = ErnieImagePipeline(transformer=reference_transformer(), vae=reference_vae(),
                              text_encoder=reference_text_encoder(), tokenizer=tokenizer,
                              scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=4.0),
                              pe=pe, pe_tokenizer=pe_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipeline")
    return pipe

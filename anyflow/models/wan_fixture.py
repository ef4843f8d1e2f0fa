"""``wan-mini``: a random-weight ``WanPipeline`` directory with the file layout and classes of
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, small enough to build in seconds and run on a CPU (DESIGN §4).

What is Wan's and what is small:

- ``model_index.json`` names ``WanPipeline`` with ``UMT5EncoderModel``, ``T5TokenizerFast``, ``AutoencoderKLWan``,
  ``WanTransformer3DModel`` and ``UniPCMultistepScheduler`` (the classes of the Hub directory).
- ``scheduler/``: Wan's own scheduler config, key for key (:data:`WAN_SCHEDULER`: UniPC, ``flow_prediction``,
  ``use_flow_sigmas``, ``flow_shift`` 3.0).
- ``vae/``: ``AutoencoderKLWan`` with Wan's strides — ``temperal_downsample`` [False, True, True] (4 in time),
  three spatial halvings (8 in space), ``z_dim`` 16, Wan's ``latents_mean``/``latents_std``, ``dim_mult``
  [1, 2, 4, 4], no attention scales — but ``base_dim`` 8 instead of 96 and one residual block per level.
- ``transformer/``: ``WanTransformer3DModel`` with Wan's in/out channels 16, patch (1, 2, 2), ``qk_norm``
  ``rms_norm_across_heads``, ``cross_attn_norm``, ``rope_max_seq_len`` 1024; 2 layers of 2 heads × 16 and
  ``text_dim`` equal to the text encoder's ``d_model``.
- ``text_encoder/``: ``UMT5EncoderModel`` with UMT5's gated-GELU feed-forward, 32 relative-attention buckets and
  scalable attention, but ``d_model`` 32 and 2 layers; ``vocab_size`` = the tokenizer's size rounded up to 64
  (as UMT5's 256384).
- ``tokenizer/``: ``T5TokenizerFast`` (``spiece.model`` + ``tokenizer.json``) from a unigram sentencepiece model
  trained here, on generated prompt-like text, with T5's special ids (pad 0, eos 1, unk 2) and NFKC normalisation.

Deterministic: the same ``seed`` gives the same tensors (module initialisers draw from a forked, seeded global RNG;
sentencepiece trains single-threaded on an unshuffled corpus). Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, scheduler/scheduler_config.json (every key but _diffusers_version)
WAN_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    solver_order=2, prediction_type="flow_prediction", thresholding=False, dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
    solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_flow_sigmas=True, flow_shift=3.0, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
    rescale_betas_zero_snr=False,
)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, the sizes this fixture shrinks (for reference and docs/gpu_runbook.md)
WAN_1_3B_SIZES = dict(
    transformer=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, freq_dim=256,
                     text_dim=4096),
    vae=dict(base_dim=96, num_res_blocks=2),
    text_encoder=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384),
)

MINI_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0, scale_factor_temporal=4, scale_factor_spatial=8)
MINI_TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                 is_gated_act=True, scalable_attention=True, tie_word_embeddings=False, dropout_rate=0.1,
                 layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
MINI_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                        out_channels=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                        rope_max_seq_len=1024)
SPM_VOCAB = 400  # sentencepiece pieces (incl. pad/eos/unk); the tokenizer adds T5's 100 sentinels
EXTRA_IDS = 100

_SUBJECTS = ["a cat", "a dog", "a red car", "an astronaut", "a panda", "two people", "a horse", "a sailboat",
             "a bicycle", "a teddy bear", "an old man", "a young woman", "a train", "a bird", "a robot", "a fox",
             "a surfer", "a chef", "a butterfly", "a jellyfish", "a skateboarder", "a couple", "an elephant"]
_ACTIONS = ["walking", "running", "dancing", "riding a bike", "playing the guitar", "swimming", "flying",
            "cooking", "reading a book", "jumping", "sleeping", "eating", "drinking coffee", "painting",
            "driving", "surfing a wave", "climbing", "spinning", "waving"]
_PLACES = ["on the beach", "in a forest", "in the city at night", "on a snowy mountain", "in a kitchen",
           "under the sea", "in outer space", "in a garden", "on a busy street", "in the desert", "by a lake",
           "in a library", "on the moon", "in the rain", "at sunset", "in Times Square"]
_STYLES = ["", "", "in the style of Van Gogh", "oil painting", "watercolor painting", "cinematic lighting",
           "in cyberpunk style", "black and white", "super slow motion", "pixel art", "with an early 20th century look"]
_CAMERA = ["", "", "camera pans left", "camera pans right", "zoom in", "zoom out", "tilt up", "tilt down",
           "the camera orbits around", "racking focus"]
_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray"]


def corpus(seed: int = 0, num_sentences: int = 3000) -> list[str]:
    """Generated prompt-like sentences (VBench's prompt shapes: subject, action, place, colour, style, camera)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_sentences):
        parts = [rng.choice(_SUBJECTS), rng.choice(_ACTIONS), rng.choice(_PLACES)]
        if rng.random() < 0.3:
            parts.insert(0, f"a {rng.choice(_COLOURS)} {rng.choice(['vase', 'umbrella', 'bus', 'kite', 'cup'])},")
        for extra in (rng.choice(_STYLES), rng.choice(_CAMERA)):
            if extra:
                parts.append(", " + extra)
        text = " ".join(parts).replace(" ,", ",")
        out.append(text[0].upper() + text[1:] + ("." if rng.random() < 0.5 else ""))
    return out


def train_sentencepiece(seed: int = 0, vocab_size: int = SPM_VOCAB) -> bytes:
    """A unigram sentencepiece model (serialized ``ModelProto``) with T5's special ids: pad 0, eos 1, unk 2; every
    printable ASCII character is a piece, so English prompts never hit ``<unk>``."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed)), model_writer=buf, model_type="unigram", vocab_size=vocab_size,
        character_coverage=1.0, required_chars=string.ascii_letters + string.digits + string.punctuation,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
        shuffle_input_sentence=False, normalization_rule_name="nmt_nfkc", hard_vocab_limit=False,
        minloglevel=2)
    return buf.getvalue()


def build_tokenizer(spm_model: bytes):
    """``T5TokenizerFast`` (transformers' tokenizers-backed T5 tokenizer) over the sentencepiece model's pieces."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5TokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    assert [v[0] for v in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:3]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    return T5TokenizerFast(vocab=vocab, _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
                           extra_ids=EXTRA_IDS)


def build(seed: int = 0):
    """The random-weight ``WanPipeline`` (CPU, float32) and the sentencepiece model bytes it was built with."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    spm_model = train_sentencepiece(seed)
    tokenizer = build_tokenizer(spm_model)
    vocab_size = -(-len(tokenizer) // 64) * 64
    with torch.random.fork_rng(devices=[]):  # initialisers draw from the global RNG: seed a fork, leave it as it was
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **MINI_TEXT))
        vae = AutoencoderKLWan(**MINI_VAE)  # latents_mean/std: diffusers' defaults are Wan2.1's
        transformer = WanTransformer3DModel(text_dim=MINI_TEXT["d_model"], **MINI_TRANSFORMER)
    scheduler = UniPCMultistepScheduler(**WAN_SCHEDULER)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       transformer=transformer.eval(), scheduler=scheduler)
    return pipe, spm_model


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: text-to-video
tags: [wan, test-fixture, random-weights]
---
# wan-mini (random weights)

A test fixture written by `anyflow fixture wan-mini` (seed {seed}): the file layout and classes of
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` with random weights and few channels. It generates noise, not videos.

```python
from diffusers import WanPipeline
pipe = WanPipeline.from_pretrained(PATH)
video = pipe("a cat walking on the beach", height=32, width=32, num_frames=5, num_inference_steps=2,
             max_sequence_length=32).frames[0]   # 5 frames of 32x32 (latents: 2 frames of 4x4)
```
"""


def write(out: str | Path, seed: int = 0) -> Path:
    """Write the fixture directory atomically; returns its path."""
    from anyflow.utils.io import atomic_dir

    pipe, spm_model = build(seed)
    out = Path(out)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "tokenizer" / "spiece.model").write_bytes(spm_model)
        index = json.loads((tmp / "model_index.json").read_text())
        index["tokenizer"] = ["transformers", "T5TokenizerFast"]  # the Hub directory's name; an alias in transformers 5
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(MODEL_CARD.format(seed=seed))
    return out

"""A tiny random Llama with a byte-level BPE tokenizer trained here, saved as an HF folder.

Fast enough for vLLM on two CPU cores, real enough that every code path
(tokenizer, answer-token derivation, LoRA, logprobs) runs as with Gemma.
"""

from __future__ import annotations

from pathlib import Path

from service.prompt import ANSWER_PREFIX, NO, YES


def _corpus() -> list[str]:
    words = ("The user's profile is gender age occupation male female student engineer programmer writer "
             "watched and rated these movies in time order More stars mean the user liked the movie more "
             "Will like Answer only Yes or No clicked star stars genres Action Comedy Drama Thriller Romance "
             "Toy Story Heat Casablanca Alien Titanic Fargo Star Wars nothing is known has not rated any yet")
    lines = [words] * 20
    lines += [f"{ANSWER_PREFIX}{YES}", f"{ANSWER_PREFIX}{NO}"] * 50
    lines += [f'{i}. "Movie {i}" ({1950 + i % 50}), {i % 5 + 1} stars' for i in range(200)]
    return lines


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (path / "config.json").exists():
        return path
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger random weights: answers that differ between prompts
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_random_adapter(model_dir: Path, path: Path, seed: int = 1, rank: int = 8) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj) with random non-zero A and B, as trainers save them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (path / "adapter_config.json").exists():
        return path
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(str(path))
    return path

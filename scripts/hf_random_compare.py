#!/usr/bin/env python3
"""hf_random_compare.py — a seeded random-weight Llama of a published shape,
saved as a Hugging Face checkpoint, with a reference.json in the format of
../shared/models/*/reference.json computed by transformers itself (weights
bf16 as saved, compute in float32 on the GPU).

    python3 scripts/hf_random_compare.py llama-3.2-1b OUTDIR [--seed 0]

tests/cuda/test_cuda_model then checks pie's CUDA backend against it:
    PIE_CUDA_HF_DIRS=OUTDIR test_cuda_model
Needs torch, transformers, safetensors (the GPU machine has them).
"""
import base64, json, os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, factor=32.0,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, factor=8.0,
                         tie_word_embeddings=False),
}

def main():
    shape, out = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
    s = dict(SHAPES[shape])
    factor = s.pop("factor")
    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0}
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=rope, bos_token_id=128000,
                      eos_token_id=128001, torch_dtype="bfloat16", **s)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")
    # transformers 5 writes "rope_parameters"; published Llama 3 checkpoints
    # (and pie's loader) use top-level rope_theta + rope_scaling: add them.
    cpath = os.path.join(out, "config.json")
    c = json.load(open(cpath))
    rp = dict(c.get("rope_parameters") or rope)
    c["rope_theta"] = rp.pop("rope_theta", 500000.0)
    c["rope_scaling"] = rp
    json.dump(c, open(cpath, "w"), indent=2)
    g = torch.Generator().manual_seed(seed + 1)
    probe = torch.randint(0, 128256, (1, 37), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():               # what bf16 compute costs transformers
        lb = model(probe.cuda()).logits[0, -1].float()
    model = model.float()              # reference: bf16 weights, f32 compute
    with torch.no_grad():
        lf = model(probe.cuda()).logits[0, -1].float()
    hf_bf16 = float((lb - lf).norm() / lf.norm())
    print(f"transformers bf16 vs f32 last-logits rel L2: {hf_bf16:.4g}")
    prompts = []
    for n in (37, 5):
        ids = torch.randint(0, 128256, (n,), generator=g).tolist()
        with torch.no_grad():
            x = torch.tensor([ids], device="cuda")
            logits = model(x).logits[0].float()
            top5 = torch.topk(logits, 5, dim=-1)
            lse = torch.logsumexp(logits, dim=-1)
            last = logits[-1].cpu().numpy().astype("<f4")
            greedy, gaps, cur = [], [], ids[:]
            for _ in range(8):
                lg = model(torch.tensor([cur], device="cuda")).logits[0, -1].float()
                t2 = torch.topk(lg, 2)
                greedy.append(int(t2.indices[0]))
                gaps.append(float(t2.values[0] - t2.values[1]))
                cur.append(greedy[-1])
        prompts.append({
            "input_ids": ids,
            "top5_ids": top5.indices.tolist(),
            "top5_logits": top5.values.tolist(),
            "logsumexp": lse.tolist(),
            "last_logits_f32_b64": base64.b64encode(last.tobytes()).decode(),
            "greedy_ids": greedy,
            "greedy_top2_gap": gaps,
        })
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"hf_bf16_rel_l2": hf_bf16, "prompts": prompts}, f)
    print(f"{shape}: saved to {out}; config rope: {getattr(cfg, 'rope_scaling', None)}")
    print(open(os.path.join(out, "config.json")).read())

if __name__ == "__main__":
    main()

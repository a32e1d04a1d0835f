# pico-decoder size of the paper, 569,808,384 parameters (vocab 50304, untied).
# The training settings of the paper's meta runs are meta_train.py's defaults: context 512,
# 256 sequences per step (32 per rank x 8 ranks, or accumulation on fewer), AdamW 3e-4,
# 2500 warm-up of 6000 steps, bf16 + torch.compile on CUDA, meta_ratio 0.5, 32-way 4-shot,
# 10 inner steps at inner_lr 0.01.
# torchrun --standalone --nproc_per_node=8 meta_train.py configs/570m.py
out_dir = "out/570m"
dim = 1536

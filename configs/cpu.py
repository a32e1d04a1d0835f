# A few-million-parameter model of the same family that trains usefully on a 2-core CPU in
# minutes: 6.7M parameters, of which 6.4M are the vocab-50304 embedding and output projection
# (and the output projection is most of the compute). The paper's recipe otherwise, scaled down:
# smaller batches, 400 steps with 20 of warm-up at a higher lr, 8-way episodes of 64-token windows
# instead of the paper's 32-way x 128. Its episodes are made well-posed (issue 24; the paper's
# read-out stays at chance here, see RESULTS.md): the state before the masked word,
# centred and scaled per episode by the support set, and an inner lr that suits such features.
# Their query loss is far steeper than the next-token loss (gradient norm 10-20x an AR step's): at
# full weight the outer loop shrinks the features and stalls the LM at the unigram level, so the
# meta loss enters at 1/100 (RESULTS.md's mechanism table).
#   python meta_train.py configs/cpu.py                                   # meta run
#   python meta_train.py configs/cpu.py --meta_ratio=0 --out_dir=out/cpu-vanilla
out_dir = "out/cpu-meta"
dim = 64
n_layers = 4
n_heads = 4
n_kv_heads = 2
seq_len = 256
batch_size = 8
total_batch_size = 16
learning_rate = 2e-3
warmup_steps = 20
max_steps = 400
eval_interval = 40
eval_sequences = 32
eval_episodes = 64  # standard error of an accuracy about 0.01
save_interval = 40
log_interval = 5
episodes_per_step = 2  # 8,192 tokens (an AR step: 4,096); 2 ranks split them evenly
n_way = 8
k_shot = 4
q_query = 4
meta_seq_len = 64
inner_lr = 0.3
meta_read = "before"
meta_features = "center"
meta_loss_weight = 0.01
init = "gpt2"  # the CPU results in RESULTS.md were measured with it (the paper configs: "pytorch")
compile = False  # compiling costs more than it saves in a few-minute CPU run

# The paper's 570m pico-decoder, 569,808,384 parameters; the rest is meta_train.py's defaults.
out_dir = "out/570m"
dim = 1536

# The paper's 65m pico-decoder, 64,595,328 parameters; the rest is meta_train.py's defaults.
out_dir = "out/65m"
dim = 384

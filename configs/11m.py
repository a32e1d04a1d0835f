# The paper's 11m pico-decoder, 11,282,784 parameters; the rest is meta_train.py's defaults.
out_dir = "out/11m"
dim = 96

# The paper's 181m pico-decoder, 181,095,168 parameters; the rest is meta_train.py's defaults.
out_dir = "out/181m"
dim = 768

"""What the test modules share (no test module imports another):

  cases         test-case generators, compile counters, jaxpr checks, int8 layer runs
  reference     NumPy references: quantization, integer contractions and requantization,
                PyTorch's quantized add / cat / pooling kernels
  torch_models  the PyTorch twins of the test models (imports torch: parity tests only)
  experiments   loading the scripts in experiments/ as modules
  simcpu        a pytest plugin that shows the native kernel library as another CPU would
"""

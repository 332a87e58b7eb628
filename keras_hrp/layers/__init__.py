from keras_hrp.layers.hrp_dense import HRPDense

"""layerdecode: decode each token from the decoder layer a pluggable strategy picks."""

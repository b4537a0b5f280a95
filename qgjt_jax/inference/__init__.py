"""Using a trained model: loading it (`model.load_model`), the decisions it
makes and the thresholds they stand on."""

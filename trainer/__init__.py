"""filterd-trainer: data preparation, fine-tuning, evaluation and refits for filterd models."""

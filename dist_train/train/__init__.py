"""One run's training loop and what it is built from: model, optimizer, data, evaluation."""

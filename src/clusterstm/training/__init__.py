"""Training loops: pretraining (Accelerate), fine-tuning (Trainer), teacher training."""

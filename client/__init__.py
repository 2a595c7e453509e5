"""What runs at a hospital: data preparation, local training, evaluation and the Flower ClientApp."""

"""What runs at the coordinating center: aggregation and federated evaluation."""

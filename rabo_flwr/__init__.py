"""rabo_flwr: federated bilevel learning."""

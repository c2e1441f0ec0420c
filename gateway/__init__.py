"""The gateway: public gRPC API, recipe execution and run state."""

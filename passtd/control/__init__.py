"""gRPC control plane. Import-light: passtctl loads only generated code from here."""

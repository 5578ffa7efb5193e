"""The torch-free core that training, export and the service share: preprocessing, the bundle format, atomic files."""

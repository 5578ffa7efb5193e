"""The FastAPI inference service over cached image embeddings."""

"""Small pieces shared by models, datasets and the engine."""

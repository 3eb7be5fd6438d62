"""The servers the service is compared with in `invoke bench`, each serving the same model with one worker."""

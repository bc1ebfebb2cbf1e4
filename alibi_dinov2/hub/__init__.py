"""The Hugging Face Hub: whether it may be reached (`offline`), files named by URL (`remote_files`), model sources
checked before any call (`sources`), feature models by name (`models`) and uploads (`push`)."""

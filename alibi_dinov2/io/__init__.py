"""Images in, as the one policy reads them (`images`), named image sets (`image_sets`) and atomic file writes
(`files`)."""

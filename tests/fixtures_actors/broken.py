"""A module that fails while being imported, as a user's typo would."""

raise RuntimeError("boom\nsecond line")

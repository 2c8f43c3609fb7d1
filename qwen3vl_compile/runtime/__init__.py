"""Running a bundle: preprocessing, MRoPE positions, sessions, generation."""

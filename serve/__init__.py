"""Chat, arena, leaderboard, L1 prompt presets and the OpenAI-compatible endpoint."""

"""deqkit."""

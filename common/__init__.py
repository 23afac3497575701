"""What every room shares: the error types the API turns into HTTP answers, and the checks that
make untrusted input (JSON, numbers, free text) safe. Imports nothing of this project."""

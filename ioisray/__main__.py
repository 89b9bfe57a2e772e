"""`python -m ioisray ...` is `ioisray ...`."""
from ioisray.cli import command

command()

"""The attention explorer: a local web page (page.html) served by server.py, whose requests are
checked by requests.py and run through the same method registry as Python and the CLI."""

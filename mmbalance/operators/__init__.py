"""One module per stage; each is a plain function on an Arrow table and a Ray Data operator class."""

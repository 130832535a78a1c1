fn hello() {}

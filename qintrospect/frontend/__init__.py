"""What every front end (the command line, the shell, qi inside gdb) shares: the commands'
options and their actions. Front ends import this; this imports no front end."""

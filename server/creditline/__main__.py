from creditline.cli import main

raise SystemExit(main())

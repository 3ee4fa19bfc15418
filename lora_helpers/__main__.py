from lora_helpers.cli import main

raise SystemExit(main())
